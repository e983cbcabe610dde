"""Worker-side state: the loaded safety vectors and each batch row's SafeInfer settings,
kept in persistent tensors that are updated in place.

Compiled graphs and CUDA graphs freeze Python values and tensor addresses, so the
steering kernel and the mixing step read these tensors and nothing else: the logits
processor writes the host copies as requests come and go, and `flush()` copies them to
the device before each forward.
"""
from __future__ import annotations

import torch

from vllm_safeinfer.common.contract import Stamp
from vllm_safeinfer.common.vector_table import VectorTable
from vllm_safeinfer.common.vectors import SafetyVector
# The probe's verdicts and `flag_position`'s "not flagged", written by its ops.
from vllm_safeinfer.kernels.probe import FLAGGED, LET_THROUGH, NEVER


class BatchState:
    """Per-row settings for up to `max_rows` running requests.

    Rows are vLLM's persistent-batch indices (V1 model runner). `scale[k, row]` is the
    request's gamma at steered layer `layers[k]` when its vector adds, `target[k, row]`
    the component `gamma * |SV|` it sets when its vector projects (0 = not steered there).

    Gated rows (mode `auto`) get their verdict from the harm probe, on the device, in the
    forward that holds their last prompt token, over the prompt positions `[read_start,
    read_end)` (stamped by the engine core); a row let through is watched by the answer
    monitor. `verdict`, `score`, `flag_position` and the probe's running sums (`window`,
    `answer`) are written there and only there (the host never flushes them; row moves
    are replayed on them as device ops), so a decision applies in that same forward. The
    host learns verdicts afterwards, without waiting for the device (`verdict_reads.py`),
    to plan the expert's rows and log decisions.
    """

    def __init__(self, vectors: VectorTable, max_rows: int, device: torch.device,
                 pin_memory: bool) -> None:
        self.vectors = vectors
        self.layer_slot = {layer: k for k, layer in enumerate(vectors.layers)}
        num_slots = max(1, len(vectors.layers))

        def host(shape, dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, pin_memory=pin_memory)

        self._host = {
            "scale": host((num_slots, max_rows), torch.float32),
            "target": host((num_slots, max_rows), torch.float32),
            "vector_id": host((max_rows,), torch.int64),
            "prompt_len": host((max_rows,), torch.int64),
            "steer_tokens": host((max_rows,), torch.int64),
            "lam": host((max_rows,), torch.float32),
            "mixes": host((max_rows,), torch.bool),
            "gated": host((max_rows,), torch.bool),
            "read_start": host((max_rows,), torch.int64),
            "read_end": host((max_rows,), torch.int64),
        }
        self._device = {k: v.to(device, copy=True) for k, v in self._host.items()}
        self.vector_table = vectors.table.to(device)
        self.unit_table = vectors.units.to(device)
        self._dirty = False
        # One spare slot past the rows: the probe scatters the rows it does not decide
        # into it, so it never needs a data-dependent shape.
        self.verdict = torch.zeros(max_rows + 1, dtype=torch.int8, device=device)
        self.score = torch.zeros(max_rows + 1, dtype=torch.float32, device=device)
        self.flag_position = torch.full((max_rows + 1,), NEVER, dtype=torch.int64,
                                        device=device)
        # (sum, count) of the probe's scores over the read window and the answer so far.
        self.window = torch.zeros(2, max_rows + 1, dtype=torch.float32, device=device)
        self.answer = torch.zeros(2, max_rows + 1, dtype=torch.float32, device=device)
        # The verdicts as the host has read them back (`verdict_reads.py`).
        self.host_verdict = torch.zeros(max_rows, dtype=torch.int8)
        self.gating = False  # set when a harm probe is installed
        self.monitoring = False  # and when it watches answers

    # Device tensors read by the steering kernel and the mixing step.
    @property
    def scale(self) -> torch.Tensor:
        return self._device["scale"]

    @property
    def target(self) -> torch.Tensor:
        return self._device["target"]

    @property
    def vector_id(self) -> torch.Tensor:
        return self._device["vector_id"]

    @property
    def prompt_len(self) -> torch.Tensor:
        return self._device["prompt_len"]

    @property
    def steer_tokens(self) -> torch.Tensor:
        """Device `[max_rows]`: how many positions a row is steered at, from where its
        steering starts (`NEVER`: all of them)."""
        return self._device["steer_tokens"]

    @property
    def lam(self) -> torch.Tensor:
        return self._device["lam"]

    @property
    def mixes(self) -> torch.Tensor:
        return self._device["mixes"]

    @property
    def gated(self) -> torch.Tensor:
        return self._device["gated"]

    @property
    def read_start(self) -> torch.Tensor:
        return self._device["read_start"]

    @property
    def read_end(self) -> torch.Tensor:
        return self._device["read_end"]

    def defended(self, num_rows: int) -> torch.Tensor:
        """Device `[num_rows]` bool: the row mixes if its mode does (ungated, or flagged at
        its prompt: a row the monitor flags later is steered only, since the expert has
        not followed its answer)."""
        return ~self.gated[:num_rows] | (self.verdict[:num_rows] == FLAGGED)

    def steered_from(self) -> torch.Tensor:
        """Device `[max_rows]`: one past the position before which a row is not steered,
        in the steering kernel's `prompt_len` form (it steers `positions >= value - 1`):
        the prompt's length for ungated rows, one past `flag_position` for gated ones
        (always computed when gating, so graphs captured without a gated row stay right
        when one comes)."""
        prompt_len = self.prompt_len
        if not self.gating:
            return prompt_len
        return torch.where(self.gated, self.flag_position[:-1] + 1, prompt_len)

    def any_mixing(self, num_rows: int) -> bool:
        """Host-side check, no device sync."""
        return bool(self._host["mixes"][:num_rows].any())

    def _let_through(self, num_rows: int) -> torch.Tensor:
        """Host `[num_rows]` bool: gated rows whose verdict, read back, is let through."""
        return self._host["gated"][:num_rows] & (self.host_verdict[:num_rows] == LET_THROUGH)

    def mixing_rows(self, num_rows: int) -> torch.Tensor:
        """Host `[num_rows]` bool: rows whose mode mixes and that the probe has not let
        through (as far as the host knows: a verdict not read back yet counts as open)."""
        return self._host["mixes"][:num_rows] & ~self._let_through(num_rows)

    @property
    def prompt_len_host(self) -> torch.Tensor:
        return self._host["prompt_len"]

    def expert_rows(self, num_rows: int, in_prefill: torch.Tensor) -> torch.Tensor:
        """Host `[num_rows]` bool: rows the expert must run on this step: those whose mode
        mixes, less gated rows past their prompt that the probe let through (a superset
        of `mixing_rows`)."""
        return self._host["mixes"][:num_rows] & ~(self._let_through(num_rows) & ~in_prefill)

    def stage_vector(self, name: str, where: str, vector: SafetyVector,
                     sha256: str) -> bool:
        """Load a published vector's row (`VectorTable.stage`), copied to the device
        table in place (the address the steering kernel and CUDA graphs read never
        changes); returns whether a row was taken."""
        entry, taken = self.vectors.stage(name, where, vector, sha256)
        if taken:
            self.vector_table[entry.index].copy_(self.vectors.table[entry.index])
            self.unit_table[entry.index].copy_(self.vectors.units[entry.index])
        return taken

    def unstage_vector(self, sha256: str) -> None:
        """Give a publication's row back (it failed before the engine core stamped any
        request with it); refused while a running row steers with it."""
        index = self.vectors.by_sha256[sha256].index
        in_use = (self._host["vector_id"] == index) & (self._host["steer_tokens"] > 0)
        if bool(in_use.any()):
            raise RuntimeError(f"SafeInfer: vector {sha256[:12]} is in use by a running "
                               "request; its row stays")
        self.vectors.unstage(sha256)
        self.vector_table[index].zero_()
        self.unit_table[index].zero_()

    def set_row(self, row: int, stamp: Stamp | None, prompt_len: int) -> None:
        """The row's settings, all from the engine core's stamp (None: SafeInfer off)."""
        self.clear_row(row)
        h = self._host
        h["prompt_len"][row] = prompt_len
        start, end = (stamp and stamp.read_window) or (prompt_len - 1, prompt_len)
        h["read_start"][row], h["read_end"][row] = start, end
        if stamp is None:
            return
        if stamp.runs.steers:
            entry = self.vectors.row(stamp.vector_sha256)
            gamma = entry.gamma if stamp.gamma is None else stamp.gamma
            strength, value = ("target", gamma * entry.norm) if entry.projects else ("scale", gamma)
            for layer in entry.layers:
                h[strength][self.layer_slot[layer], row] = value
            h["vector_id"][row] = entry.index
            h["steer_tokens"][row] = entry.answer_tokens or NEVER
        if stamp.runs.mixes:
            h["mixes"][row] = True
            h["lam"][row] = stamp.lam
        h["gated"][row] = stamp.gated

    def _per_row(self) -> tuple[torch.Tensor, ...]:
        return (*self._host.values(), self.verdict, self.score, self.window, self.answer,
                self.flag_position, self.host_verdict)

    def clear_row(self, row: int) -> None:
        for t in self._per_row():
            t[..., row] = 0
        self.flag_position[row] = NEVER
        self._dirty = True

    def move(self, src: int, dst: int) -> None:
        for t in self._per_row():
            t[..., dst] = t[..., src]
        self.clear_row(src)

    def swap(self, a: int, b: int) -> None:
        for t in self._per_row():
            t[..., [a, b]] = t[..., [b, a]]
        self._dirty = True

    def flush(self) -> None:
        """Copy changed rows to the device in place (addresses never change)."""
        if self._dirty:
            for name, t in self._host.items():
                self._device[name].copy_(t, non_blocking=True)
            self._dirty = False
