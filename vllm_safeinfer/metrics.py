"""SafeInfer's Prometheus metrics, served by vLLM's own `/metrics`.

- `vllm_safeinfer:requests_total{mode}` and `vllm_safeinfer:generation_tokens_total{mode}`:
  counted in the frontend by a vLLM stat-logger plugin (entry point
  `vllm.stat_logger_plugins`), from vLLM's finished-request stats, each request's mode
  noted as the frontend admitted it.
- `vllm_safeinfer:mixing_changed_tokens_total`: sampled rows whose greedy choice (the
  argmax) mixing changed, counted in the worker. A worker's counters reach `/metrics`
  through Prometheus's multiprocess mode, which `safeinfer serve` turns on
  (`PROMETHEUS_MULTIPROC_DIR`, as vLLM does for several API servers); under plain `vllm
  serve`, set that variable to a fresh folder to see it. Rows the sampler processes in
  the middle of a chunked prefill count too: the logits processor cannot tell them apart.
- `vllm_safeinfer:gate_decisions_total{defence, decision}`: requests in mode `auto` the
  harm probe flagged or let through, counted in the worker (multiprocess mode as above).
"""
from __future__ import annotations

from collections import OrderedDict
from functools import cache

from vllm.v1.metrics.loggers import StatLoggerBase

from vllm_safeinfer.modes import Mode

MAX_PENDING = 100_000  # admitted requests remembered until they finish


@cache
def counters():
    """The counters, created once per process (Prometheus refuses a second copy)."""
    from prometheus_client import Counter

    return {
        "requests": Counter("vllm_safeinfer:requests", "Requests finished, by SafeInfer mode",
                            ["mode"]),
        "tokens": Counter("vllm_safeinfer:generation_tokens",
                          "Generated tokens of finished requests, by SafeInfer mode", ["mode"]),
        "changed": Counter("vllm_safeinfer:mixing_changed_tokens",
                           "Sampled rows whose argmax mixing with the unsafe expert changed"),
        "gate": Counter("vllm_safeinfer:gate_decisions",
                        "Requests in mode auto the harm probe flagged (they ran their "
                        "defence) or let through (they ran as off)", ["defence", "decision"]),
    }


_modes: OrderedDict[str, Mode] = OrderedDict()


def note_mode(request_id: str, mode: Mode) -> None:
    """The frontend admitted `request_id` in `mode` (vLLM's external request id)."""
    _modes[request_id] = mode
    while len(_modes) > MAX_PENDING:
        _modes.popitem(last=False)


class SafeInferStatLogger(StatLoggerBase):
    """Turns vLLM's finished-request stats into the per-mode counters."""

    def __init__(self, vllm_config, engine_index: int = 0) -> None:
        self.enabled = vllm_config.additional_config is not None and bool(
            vllm_config.additional_config.get("safeinfer"))

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
        if not self.enabled or iteration_stats is None:
            return
        for finished in iteration_stats.finished_requests:
            mode = _modes.pop(finished.request_id, None)
            if mode is None:
                continue
            counters()["requests"].labels(mode=mode.value).inc()
            counters()["tokens"].labels(mode=mode.value).inc(finished.num_generation_tokens)

    def log_engine_initialized(self) -> None:
        """Nothing to say at start-up: the counters start at zero."""
