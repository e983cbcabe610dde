"""`SafeInferLogitsProcessor`: vLLM's per-request hook for SafeInfer.

It validates request options at the frontend (`validate_params`: a ValueError there is
an HTTP 400 and the engine keeps serving; the one resolution of the frontend, handed to
its metrics), tracks which batch row runs which settings (`update_state`, called before
every forward: each row's settings are what the engine core stamped on its request, so
it also feeds the steering kernel and collects the harm probe's verdicts), and mixes the unsafe expert's distribution into
the rows that ask for it and that the probe did not let through (`apply`).
"""
from __future__ import annotations

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from vllm_safeinfer.common.config import SafeInferConfig
from vllm_safeinfer.common.contract import Stamp
from vllm_safeinfer.common.request_options import validate
from vllm_safeinfer.common.vector_table import VectorTable
from vllm_safeinfer.engine.batch_state import BatchState
from vllm_safeinfer.engine.expert import ExpertLogits
from vllm_safeinfer.engine.gate_log import GateLog
from vllm_safeinfer.engine.metrics import ChangedTokens
from vllm_safeinfer.engine.publishing import StagedVector
from vllm_safeinfer.engine.verdict_reads import VerdictReads
from vllm_safeinfer.kernels.mix import mix_

FQCN = "vllm_safeinfer:SafeInferLogitsProcessor"


class SafeInferLogitsProcessor(LogitsProcessor):
    """One instance per worker; inert when the server has no SafeInfer config."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        validate(sampling_params.extra_args)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        from vllm.tokenizers import cached_tokenizer_from_config

        self.config = SafeInferConfig.from_additional_config(vllm_config.additional_config)
        self.state: BatchState | None = None
        self.expert: ExpertLogits | None = None
        self.gate_log = GateLog()
        self.staged: StagedVector | None = None  # a vector publication in flight
        self.changed_tokens = ChangedTokens(device, is_pin_memory)
        self.verdicts: VerdictReads | None = None
        if self.config is None:
            return
        model_config = vllm_config.model_config
        self.state = BatchState(
            VectorTable(self.config, model_config),
            max_rows=vllm_config.scheduler_config.max_num_seqs,
            device=device,
            pin_memory=is_pin_memory,
        )
        self.verdicts = VerdictReads(self.state, self.gate_log, is_pin_memory)
        # Ids >= len(tokenizer) are embedding padding, not tokens: mixing masks them.
        self.vocab_size = len(cached_tokenizer_from_config(model_config))

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        state, verdicts = self.state, self.verdicts
        if state is None:
            return
        verdicts.start()  # the last forward's verdicts, in its row order
        verdicts.land()
        if batch_update is not None:
            for row in batch_update.removed:
                state.clear_row(row)
                verdicts.leave(row)
            for row, params, prompt_ids, _ in batch_update.added:
                stamp = Stamp.of(params.extra_args)
                prompt_len = len(prompt_ids or ())
                state.set_row(row, stamp, prompt_len)
                verdicts.leave(row)
                if stamp is not None and stamp.gated:
                    verdicts.admit(row, stamp.request_id, stamp.runs, prompt_len)
            for a, b, direction in batch_update.moved:
                if direction == MoveDirectionality.SWAP:
                    state.swap(a, b)
                    verdicts.swap(a, b)
                else:
                    state.move(a, b)
                    verdicts.move(a, b)
        state.flush()
        if self.expert is not None:
            self.changed_tokens.step()

    def collect_verdicts(self) -> None:
        """Log every verdict the forwards have taken so far, waiting for their copies (for
        `Worker.safeinfer_gate_decisions` and `/metrics`, between steps: after a
        request's last step the engine may not step again for a while)."""
        if self.verdicts is not None:
            self.verdicts.start()
            self.verdicts.land(wait=True)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        state, expert = self.state, self.expert
        num_rows = logits.shape[0]
        if state is None or expert is None or not state.any_mixing(num_rows):
            return logits
        rows, expert_logits = expert.take(num_rows)
        # Rows whose mode mixes, less gated rows the probe has not flagged (decided on
        # the device in this very forward for a request's first token).
        mixing = state.mixes[:num_rows] & state.defended(num_rows)
        lam = state.lam[:num_rows]
        if rows is None:
            self._mix(logits, expert_logits, lam, mixing)
        elif rows.numel():
            index = rows.to(logits.device)
            part = logits[index]
            self._mix(part, expert_logits, lam[index], mixing[index])
            logits[index] = part
        return logits

    def _mix(self, logits: torch.Tensor, expert_logits: torch.Tensor, lam: torch.Tensor,
             mixing: torch.Tensor) -> None:
        before = logits.argmax(dim=-1)  # vLLM's greedy choice: padding ids included
        mix_(logits, expert_logits, lam, mixing, self.vocab_size)
        self.changed_tokens.add(before, logits.argmax(dim=-1), mixing)
