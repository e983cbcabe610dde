"""SafeInfer's per-mode Prometheus metrics, counted in the API server and served by
vLLM's own `/metrics` (the workers' counters: `engine/metrics.py`).

`vllm_safeinfer:requests_total{mode}` and `vllm_safeinfer:generation_tokens_total{mode}`
are counted by a vLLM stat-logger plugin (entry point `vllm.stat_logger_plugins`) from
vLLM's finished-request stats, each request's mode noted as the frontend admitted it.
Every child of an `n > 1` request finishes under the parent's id, so the mode is kept
until all of them did.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import cache

from vllm.v1.metrics.loggers import StatLoggerBase

from vllm_safeinfer.common.modes import Mode

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
    }


_modes: OrderedDict[str, tuple[Mode, int]] = OrderedDict()


def note_mode(request_id: str, mode: Mode, children: int = 1) -> None:
    """The frontend admitted `request_id` (vLLM's external request id) in `mode`, to be
    generated `children` times (`n`)."""
    _modes[request_id] = (mode, children)
    while len(_modes) > MAX_PENDING:
        _modes.popitem(last=False)


def _finished(request_id: str) -> Mode | None:
    """The mode of a request one of whose children finished."""
    noted = _modes.get(request_id)
    if noted is None:
        return None
    mode, children = noted
    if children > 1:
        _modes[request_id] = (mode, children - 1)
    else:
        del _modes[request_id]
    return mode


class SafeInferStatLogger(StatLoggerBase):
    """Turns vLLM's finished-request stats into the per-mode counters."""

    def __init__(self, vllm_config, engine_index: int = 0) -> None:
        self.enabled = vllm_config.additional_config is not None and bool(
            vllm_config.additional_config.get("safeinfer"))

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
        if not self.enabled or iteration_stats is None:
            return
        for finished in iteration_stats.finished_requests:
            mode = _finished(finished.request_id)
            if mode is None:
                continue
            counters()["requests"].labels(mode=mode.value).inc()
            counters()["tokens"].labels(mode=mode.value).inc(finished.num_generation_tokens)

    def log_engine_initialized(self) -> None:
        """Nothing to say at start-up: the counters start at zero."""
