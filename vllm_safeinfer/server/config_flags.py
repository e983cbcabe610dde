"""The `--safeinfer-*` flags and `--safeinfer-config FILE.json` of the `safeinfer`
commands (`serve`, `harmeval`): they map onto the keys of the one `safeinfer` dict (flags
win over the file), validated by `SafeInferConfig`."""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from vllm_safeinfer.common.config import SafeInferConfig, load_json_file

# flag -> (config key, argparse kwargs). The flag is `--safeinfer-` + key with dashes.
FLAGS: dict[str, dict[str, Any]] = {
    "vector": dict(help="safety vector file (its name is 'default')"),
    "vectors": dict(nargs="+", metavar="NAME=FILE", help="named safety vector files"),
    "default_vector": dict(help="vector used when a request names none"),
    "layer": dict(type=int, help="decoder layer to steer (overrides the files')"),
    "gamma": dict(type=float, help="default steering strength"),
    "mode": dict(choices=("off", "sa", "sgds", "safeinfer", "auto"),
                 help="mode of requests that do not choose one"),
    "probe": dict(help="harm probe file (`safeinfer probe build`) for mode auto"),
    "probe_threshold": dict(type=float, help="harm probe threshold (overrides the file's)"),
    "defence": dict(choices=("sa", "sgds", "safeinfer"),
                    help="what mode auto runs on a flagged request (default: the strongest "
                    "configured)"),
    "enforce": dict(action="store_const", const=True,
                    help="refuse requests that set any safeinfer_* option"),
    "expert_model": dict(help="unsafe expert checkpoint (same tokenizer)"),
    "expert_dtype": dict(help="expert dtype (default: the served model's)"),
    "expert_shares_weights": dict(
        action="store_const", const=True,
        help="run an `ablate` expert on the served model's own weights, its rows inside the "
        "served model's forward (its memory: its KV cache alone)"),
    "lam": dict(type=float, help="default lam of safety-guided decoding"),
    "allow_other_model_vectors": dict(
        action="store_const", const=True,
        help="serve vectors whose recorded model fingerprint differs from the served model's "
        "or is of an older scheme"),
}


def add_safeinfer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--safeinfer-config", metavar="FILE.json",
                        help="JSON object with the same keys as the `safeinfer` dict")
    for key, kwargs in FLAGS.items():
        parser.add_argument(f"--safeinfer-{key.replace('_', '-')}", dest=key, **kwargs)


def safeinfer_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The config file overlaid with the flags that were given, validated."""
    raw: dict[str, Any] = load_json_file(args.safeinfer_config) if args.safeinfer_config else {}
    for key in FLAGS:
        value = getattr(args, key)
        if value is None:
            continue
        if key == "vectors":
            value = {**raw.get("vectors", {}), **_named_files(value)}
        raw[key] = value
    SafeInferConfig.from_dict(raw)
    return raw


def _named_files(items: Sequence[str]) -> dict[str, str]:
    named = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--safeinfer-vectors expects NAME=FILE, got {item!r}")
        named[name] = path
    return named
