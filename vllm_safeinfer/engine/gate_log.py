"""The harm probe's verdicts as the worker learns them: counted for Prometheus and kept
per request id, so HarmEval (through `collective_rpc`) can record each response's gate
decision."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from vllm_safeinfer.common.modes import Mode
from vllm_safeinfer.engine.metrics import counters

MAX_KEPT = 100_000  # verdicts remembered for lookup, newest kept


@dataclass(frozen=True)
class GateDecision:
    """One gated request's verdict: flagged (it ran `defence`) or let through (`off`), and
    where it was flagged: `"prompt"`, or `"token N"` when the answer monitor flagged its
    generated token N (0-based; the defence acts from token N + 1 on)."""

    flagged: bool
    score: float
    defence: str
    flagged_at: str | None = None

    def to_dict(self) -> dict:
        return {"flagged": self.flagged, "score": self.score, "defence": self.defence,
                "flagged_at": self.flagged_at}


class GateLog:
    """Verdicts by request id (vLLM's external id). A request decided twice (preempted and
    recomputed: the same prompt, so the same verdict) counts once."""

    def __init__(self) -> None:
        self._decisions: OrderedDict[str, GateDecision] = OrderedDict()

    def record(self, request_id: str | None, defence: Mode, flagged: bool,
               score: float) -> None:
        decision = GateDecision(flagged, score, defence.value, "prompt" if flagged else None)
        if request_id is not None:
            if request_id in self._decisions:
                return
            self._decisions[request_id] = decision
            while len(self._decisions) > MAX_KEPT:
                self._decisions.popitem(last=False)
        counters()["gate"].labels(
            defence=defence.value, decision="flagged" if flagged else "let_through").inc()

    def record_answer_flag(self, request_id: str | None, defence: Mode, token: int) -> None:
        """The answer monitor flagged a request let through at its prompt."""
        if request_id is not None:
            known = self._decisions.get(request_id)
            if known is not None and known.flagged:
                return
            self._decisions[request_id] = GateDecision(
                True, known.score if known is not None else float("nan"), defence.value,
                f"token {token}")
        counters()["gate"].labels(defence=defence.value, decision="flagged_in_answer").inc()

    def lookup(self, request_ids: list[str]) -> dict[str, dict]:
        """The verdicts of `request_ids` this worker knows."""
        return {rid: self._decisions[rid].to_dict() for rid in request_ids
                if rid in self._decisions}
