"""A server command run as a subprocess, for the tools that start one and talk to it
(the tests' servers, `benchmarks/serving.py`): it runs in the tool's process, apart from
the `safeinfer serve` command itself."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path


INSECURE_SERIALIZATION = "VLLM_ALLOW_INSECURE_SERIALIZATION"


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
    process group afterwards (SIGTERM, then SIGKILL after 60 s).

    The server runs as users run it: vLLM's insecure serialization (pickled callables
    over `collective_rpc`, which in-process test engines turn on) is never passed on."""
    import httpx

    env = {k: v for k, v in (os.environ if env is None else env).items()
           if k != INSECURE_SERIALIZATION}
    with open(log if log is not None else os.devnull, "w") as out:
        process = subprocess.Popen(list(command), env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
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
