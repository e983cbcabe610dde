"""The counters a worker keeps, served by vLLM's `/metrics` through Prometheus's
multiprocess mode (which `safeinfer serve` turns on with `PROMETHEUS_MULTIPROC_DIR`, as
vLLM does for several API servers; under plain `vllm serve`, set that variable to a fresh
folder to see them).

- `vllm_safeinfer:mixing_changed_tokens_total`: sampled rows whose greedy choice (the
  argmax) mixing with the unsafe expert changed. Counted on the device and added here
  every `READ_EVERY` steps, whenever requests finish and when the API server answers a
  scrape of `/metrics` (`Worker.safeinfer_report_metrics`), so a step never waits for
  the device. Rows the sampler processes in the middle of a chunked prefill count too: the
  logits processor cannot tell them apart.
- `vllm_safeinfer:gate_decisions_total{defence, decision}`: requests in mode `auto` the
  harm probe flagged or let through.
"""
from __future__ import annotations

from functools import cache

import torch

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
    """The mixing metric's device-side tally: `add` costs no host synchronisation;
    `report` (every `READ_EVERY` steps, or when requests finish) reads it once."""

    def __init__(self, device: torch.device) -> None:
        self._count = torch.zeros((), dtype=torch.int64, device=device)
        self._steps = 0

    def add(self, before: torch.Tensor, after: torch.Tensor, rows: torch.Tensor) -> None:
        """Count `rows` whose argmax moved from `before` to `after`."""
        self._count += ((after != before) & rows).sum()

    def step(self, requests_finished: bool) -> None:
        """Called once per engine step; reads the tally when it is due."""
        self._steps += 1
        if requests_finished or self._steps >= READ_EVERY:
            self.report()

    def report(self) -> None:
        self._steps = 0
        changed = int(self._count.item())
        if changed:
            self._count.zero_()
            counters()["changed"].inc(changed)
