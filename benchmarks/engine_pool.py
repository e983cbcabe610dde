"""Engines kept alive in child processes for a whole benchmark, so modes can be measured
interleaved under the same machine conditions (`throughput.py`, `profile_step.py`).

A child builds its engine, sends "ready", then answers each message it receives until it
receives None."""
from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class EnginePool:
    def __init__(self) -> None:
        self._context = mp.get_context("spawn")
        self._engines: dict[str, tuple[Any, Any]] = {}

    def start(self, kind: str, target: Callable, *args: Any) -> None:
        """Start `target(conn, *args)` and wait until it is ready. Engines start one after
        the other: two starting at once compete for the cores."""
        parent, child = self._context.Pipe()
        process = self._context.Process(target=target, args=(child, *args))
        process.start()
        self._engines[kind] = (parent, process)
        self._receive(kind)

    def ask(self, kind: str, message: Any) -> Any:
        self._engines[kind][0].send(message)
        return self._receive(kind)

    def _receive(self, kind: str) -> Any:
        """The engine's answer; an error if its process died instead of answering."""
        conn, process = self._engines[kind]
        while not conn.poll(1.0):
            if not process.is_alive():
                raise RuntimeError(f"the engine process {kind!r} exited ({process.exitcode})")
        return conn.recv()

    def close(self) -> None:
        for conn, process in self._engines.values():
            if process.is_alive():
                conn.send(None)
        for _, process in self._engines.values():
            process.join(timeout=60)
            if process.is_alive():
                process.kill()


@contextmanager
def engine_pool() -> Iterator[EnginePool]:
    pool = EnginePool()
    try:
        yield pool
    finally:
        pool.close()
