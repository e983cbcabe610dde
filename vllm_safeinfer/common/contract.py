"""What crosses SafeInfer's process boundaries, defined once: the engine core's stamp on
each request (the one resolution of its options that the workers and the prefix cache
read) and the names of the calls the API server makes into the engine."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vllm_safeinfer.common.modes import Mode

# The key of `SamplingParams.extra_args` the engine core writes its stamp under; whatever
# a request carried there is dropped first.
STAMP_ARG = "_safeinfer"

# Worker calls (`collective_rpc`; the plugin adds them to vLLM's Worker).
STAGE_VECTOR = "safeinfer_stage_vector"
TAKE_BACK_VECTOR = "safeinfer_take_back_vector"
GATE_DECISIONS = "safeinfer_gate_decisions"
REPORT_METRICS = "safeinfer_report_metrics"
# Engine-core utility call (`call_utility_async`; the plugin adds it to EngineCore).
PUBLISH_VECTOR = "safeinfer_publish_vector"


@dataclass(frozen=True)
class Stamp:
    """A request's SafeInfer settings as the engine core resolved them.

    `mode` is the mode as asked (`auto` for a gated request), `runs` what runs: the mode
    itself, or for a gated request the defence a flag turns on. `vector_sha256` is the
    identity of the vector it steers with (None unless `runs` steers), `gamma` its
    strength (None: the vector's default), `lam` the expert's weight (None unless `runs`
    mixes), `kv_key` its prefix-cache identity (None when nothing shapes its KV) and
    `read_window` the prompt positions a gated request's harm probe reads."""

    request_id: str
    mode: Mode
    runs: Mode
    vector_sha256: str | None = None
    gamma: float | None = None
    lam: float | None = None
    kv_key: str | None = None
    read_window: tuple[int, int] | None = None

    @property
    def gated(self) -> bool:
        return self.mode is Mode.AUTO

    @property
    def writes_expert_kv(self) -> bool:
        """Its blocks hold the expert's KV (it may mix)."""
        return self.runs.mixes

    def to_args(self) -> dict[str, Any]:
        """The stamp as plain values (it travels to the workers inside `extra_args`)."""
        return {"request": self.request_id, "mode": self.mode.value, "runs": self.runs.value,
                "vector": self.vector_sha256, "gamma": self.gamma, "lam": self.lam,
                "kv": self.kv_key,
                "window": None if self.read_window is None else list(self.read_window)}

    @classmethod
    def of(cls, extra_args: Mapping[str, Any] | None) -> Stamp | None:
        """The stamp in a request's `extra_args`, None when the engine core wrote none."""
        raw = (extra_args or {}).get(STAMP_ARG)
        if raw is None:
            return None
        window = raw["window"]
        return cls(raw["request"], Mode(raw["mode"]), Mode(raw["runs"]), raw["vector"],
                   raw["gamma"], raw["lam"], raw["kv"],
                   None if window is None else (int(window[0]), int(window[1])))
