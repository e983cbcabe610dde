"""The harm probe's verdicts, read back to the host without making a step wait for them.

The harm probe decides on the device (`gating.py`); the host learns its verdicts to log
them and to stop running the expert on rows it let through (`expert_rows.py`). Reading
them when a step starts would make the step wait for the last forward on a GPU. Instead
each step queues a copy of the verdicts behind the forward's work (`host_copy.py`) and uses
the copies that have landed: a verdict reaches the host a step or two late, which only
means the expert runs a step longer on a row let through (the mix itself reads the
verdict on the device, in the forward that took it). On the CPU a copy lands at once.
Only the RPCs that answer an operator (`/metrics`, a gate decision) wait for them.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass


from vllm_safeinfer.common.modes import Mode
from vllm_safeinfer.engine.batch_state import BatchState
from vllm_safeinfer.engine.gate_log import GateLog
from vllm_safeinfer.engine.host_copy import HostCopy
from vllm_safeinfer.kernels.probe import FLAGGED, LET_THROUGH, NEVER, PENDING


@dataclass(eq=False)
class GatedRequest:
    """A gated request as the host knows it; `row` follows the batch (None once gone)."""

    request_id: str | None
    defence: Mode
    prompt_len: int
    row: int | None
    verdict: int = PENDING
    answer_flagged: bool = False


class VerdictReads:
    """The gated requests of one worker and the copies of their verdicts in flight."""

    def __init__(self, state: BatchState, gate_log: GateLog, pin_memory: bool) -> None:
        self.state = state
        self.gate_log = gate_log
        self.pin_memory = pin_memory
        self.rows: dict[int, GatedRequest] = {}
        self._in_flight: deque[tuple[HostCopy, list[tuple[int, GatedRequest]]]] = deque()

    def admit(self, row: int, request_id: str | None, defence: Mode, prompt_len: int) -> None:
        self.rows[row] = GatedRequest(request_id, defence, prompt_len, row)

    def leave(self, row: int) -> None:
        request = self.rows.pop(row, None)
        if request is not None:
            request.row = None

    def move(self, src: int, dst: int) -> None:
        request = self.rows.pop(src, None)
        if request is not None:
            request.row = dst
            self.rows[dst] = request

    def swap(self, a: int, b: int) -> None:
        first, second = self.rows.pop(a, None), self.rows.pop(b, None)
        for row, request in ((b, first), (a, second)):
            if request is not None:
                request.row = row
                self.rows[row] = request

    def start(self) -> None:
        """Queue a copy of what the last forward decided for the requests still open
        (call before the batch changes: the copy is read in the forward's row order)."""
        watching = self.state.monitoring
        open_rows = [(row, r) for row, r in self.rows.items()
                     if r.verdict == PENDING or (watching and r.verdict == LET_THROUGH
                                                 and not r.answer_flagged)]
        if open_rows:
            state = self.state
            copy = HostCopy((state.verdict, state.score, state.flag_position), self.pin_memory)
            self._in_flight.append((copy, open_rows))

    def land(self, wait: bool = False) -> None:
        """Log the copies that have landed, oldest first (all of them when `wait`)."""
        while self._in_flight and (wait or self._in_flight[0][0].ready()):
            copy, open_rows = self._in_flight.popleft()
            copy.wait()
            verdict, score, flag_position = copy.values
            for row, request in open_rows:
                self._learn(request, int(verdict[row]), float(score[row]),
                            int(flag_position[row]))

    def _learn(self, request: GatedRequest, verdict: int, score: float,
               flag_position: int) -> None:
        if request.verdict == PENDING and verdict != PENDING:
            request.verdict = verdict
            if request.row is not None:
                self.state.host_verdict[request.row] = verdict
            self.gate_log.record(request.request_id, request.defence, verdict == FLAGGED,
                                 score)
        if (request.verdict == LET_THROUGH and not request.answer_flagged
                and flag_position < NEVER):
            request.answer_flagged = True
            self.gate_log.record_answer_flag(request.request_id, request.defence,
                                             flag_position - request.prompt_len)
