"""Host copies of device tensors that never make a step wait: the copy is queued behind
the work already on the stream, and the reader polls its event (on the CPU it is done at
once). What the forward writes on the device (the harm probe's verdicts, the mixing
metric's tally) reaches the host this way (`verdict_reads.py`, `metrics.py`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


class HostCopy:
    """Host copies of device tensors, queued behind the work already on the stream."""

    def __init__(self, tensors: Sequence[torch.Tensor], pin_memory: bool) -> None:
        self.values = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pin_memory)
                       for t in tensors]
        for host, device in zip(self.values, tensors):
            host.copy_(device, non_blocking=True)
        self._event = None
        if any(t.is_cuda for t in tensors):
            self._event = torch.cuda.Event()
            self._event.record()

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()
