"""The counters a worker keeps, served by vLLM's `/metrics` through Prometheus's
multiprocess mode (which `safeinfer serve` turns on with `PROMETHEUS_MULTIPROC_DIR`, as
vLLM does for several API servers; under plain `vllm serve`, set that variable to a fresh
folder to see them).

- `vllm_safeinfer:mixing_changed_tokens_total`: sampled rows whose greedy choice (the
  argmax) mixing with the unsafe expert changed. Counted on the device; every
  `READ_EVERY` steps a copy of the count is queued behind the step's work and added here
  once it has landed, so no step waits for the device; a scrape of `/metrics` (at most
  one read of the workers per interval: `server/http_api.py`) waits for what is left
  (`Worker.safeinfer_report_metrics`). Rows the sampler processes in the middle of a
  chunked prefill count too: the logits processor cannot tell them apart.
- `vllm_safeinfer:gate_decisions_total{defence, decision}`: requests in mode `auto` the
  harm probe flagged or let through.
"""
from __future__ import annotations

from collections import deque
from functools import cache

import torch

from vllm_safeinfer.engine.host_copy import HostCopy

READ_EVERY = 64  # engine steps between reads of the device-side count


@cache
def counters():
    """The counters, created once per process (Prometheus refuses a second copy)."""
    from prometheus_client import Counter

    return {
        "changed": Counter("vllm_safeinfer:mixing_changed_tokens",
                           "Sampled rows whose argmax mixing with the unsafe expert changed"),
        "gate": Counter("vllm_safeinfer:gate_decisions",
                        "Requests in mode auto the harm probe flagged (they ran their "
                        "defence) or let through (they ran as off)", ["defence", "decision"]),
    }


class ChangedTokens:
    """The mixing metric's device-side tally: `add` costs no host synchronisation, nor
    does `step`, which queues a copy of it every `READ_EVERY` steps; `report` waits."""

    def __init__(self, device: torch.device, pin_memory: bool) -> None:
        self._count = torch.zeros((), dtype=torch.int64, device=device)
        self._pin_memory = pin_memory
        self._steps = 0
        self._in_flight: deque[HostCopy] = deque()

    def add(self, before: torch.Tensor, after: torch.Tensor, rows: torch.Tensor) -> None:
        """Count `rows` whose argmax moved from `before` to `after`."""
        self._count += ((after != before) & rows).sum()

    def step(self) -> None:
        """Called once per engine step: queues a read when one is due, adds what landed."""
        self._steps += 1
        if self._steps >= READ_EVERY:
            self._start()
        self._land(wait=False)

    def report(self) -> None:
        """Add everything counted so far (waits for the device)."""
        self._start()
        self._land(wait=True)

    def _start(self) -> None:
        self._steps = 0
        self._in_flight.append(HostCopy((self._count,), self._pin_memory))
        self._count.zero_()  # after the copy on the same stream

    def _land(self, wait: bool) -> None:
        while self._in_flight and (wait or self._in_flight[0].ready()):
            copy = self._in_flight.popleft()
            copy.wait()
            changed = int(copy.values[0])
            if changed:
                counters()["changed"].inc(changed)
