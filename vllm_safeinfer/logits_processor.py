"""`SafeInferLogitsProcessor`: vLLM's per-request hook for SafeInfer.

It validates request options at the frontend (`validate_params`: a ValueError there is
an HTTP 400 and the engine keeps serving), tracks which batch row runs which settings
(`update_state`, called before every forward, so it also feeds the steering kernel), and
mixes the unsafe expert's distribution into the rows that ask for it (`apply`).
"""
from __future__ import annotations

import logging

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from vllm_safeinfer import frontend
from vllm_safeinfer.batch_state import BatchState, VectorTable
from vllm_safeinfer.config import SafeInferConfig
from vllm_safeinfer.expert import ExpertLogits
from vllm_safeinfer.kernels.mix import mix_
from vllm_safeinfer.metrics import counters
from vllm_safeinfer.prefix_cache import VERSION_ARG
from vllm_safeinfer.request_options import resolve_or_defaults, resolve_request

logger = logging.getLogger(__name__)

FQCN = "vllm_safeinfer:SafeInferLogitsProcessor"


class SafeInferLogitsProcessor(LogitsProcessor):
    """One instance per worker; inert when the server has no SafeInfer config."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        resolve_request(sampling_params.extra_args, frontend.config_being_validated())

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        from vllm.tokenizers import cached_tokenizer_from_config

        self.config = SafeInferConfig.from_additional_config(vllm_config.additional_config)
        self.state: BatchState | None = None
        self.expert: ExpertLogits | None = None
        if self.config is None:
            return
        model_config = vllm_config.model_config
        self.state = BatchState(
            VectorTable(self.config, model_config),
            max_rows=vllm_config.scheduler_config.max_num_seqs,
            device=device,
            pin_memory=is_pin_memory,
        )
        # Ids >= len(tokenizer) are embedding padding, not tokens: mixing masks them.
        self.vocab_size = len(cached_tokenizer_from_config(model_config))

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        state = self.state
        if state is None:
            return
        if batch_update is not None:
            for row in batch_update.removed:
                state.clear_row(row)
            for row, params, prompt_ids, _ in batch_update.added:
                # Never raise here: an error would kill the engine for every request.
                settings, error = resolve_or_defaults(params.extra_args, self.config)
                if error is not None:
                    logger.warning("SafeInfer: a request's options do not resolve (%s); it "
                                   "runs with the server's defaults", error)
                version = (params.extra_args or {}).get(VERSION_ARG, 0)
                state.set_row(row, settings, len(prompt_ids or ()), version)
            for a, b, direction in batch_update.moved:
                if direction == MoveDirectionality.SWAP:
                    state.swap(a, b)
                else:
                    state.move(a, b)
        state.flush()

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        state, expert = self.state, self.expert
        num_rows = logits.shape[0]
        if state is None or expert is None or not state.any_mixing(num_rows):
            return logits
        mixing = state.mixes[:num_rows]
        before = logits[:, :self.vocab_size].argmax(dim=-1)
        mix_(logits, expert.take(num_rows), state.lam[:num_rows], mixing, self.vocab_size)
        changed = int(((logits[:, :self.vocab_size].argmax(dim=-1) != before) & mixing).sum())
        if changed:
            counters()["changed"].inc(changed)
        return logits
