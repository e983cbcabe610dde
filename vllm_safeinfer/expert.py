"""The unsafe expert of safety-guided decoding, inside the served model's worker.

It is loaded the way vLLM's draft-model speculative decoding loads a draft: its attention
layers register in the shared forward context, so vLLM gives them paged KV cache in the
same block table as the served model (no scheduler change; their KV comes out of the same
block budget). The served model's `forward` then also runs the expert on the same tokens
and positions, never steered, and returns both hidden states side by side;
`compute_logits` splits them, returns the served model's logits and keeps the expert's
for the logits processor. The expert runs on every token of every step, whatever the
requests' modes: a block of KV it skipped could later be reused through prefix caching
(or by a request whose mode needs it) and would hold garbage.

An `ablate` expert can instead share the served model's weights
(`expert_shares_weights`, `shared_expert.py`): then only its KV cache costs memory.
"""
from __future__ import annotations

import torch
from torch import nn

from vllm_safeinfer.config import SafeInferConfig

MODEL_TAG = "safeinfer_expert"


class ExpertLogits:
    """The expert's logits of the current step, handed from `compute_logits` to the
    logits processor (same rows, same order), and the expert module that made them."""

    def __init__(self, dtype: torch.dtype, model: nn.Module) -> None:
        self.dtype = dtype  # what the expert's weights are in
        self.model = model
        self._logits: torch.Tensor | None = None

    def put(self, logits: torch.Tensor) -> None:
        self._logits = logits

    def take(self, num_rows: int) -> torch.Tensor:
        logits, self._logits = self._logits, None
        if logits is None or logits.shape[0] != num_rows:
            raise RuntimeError(
                "SafeInfer: the expert's logits are missing or misaligned with the batch "
                f"({None if logits is None else logits.shape[0]} rows for {num_rows})"
            )
        return logits


def expert_model_config(config: SafeInferConfig, base_model_config):
    """vLLM ModelConfig of the expert: the served model's tokenizer and limits."""
    from vllm.config import ModelConfig

    return ModelConfig(
        model=config.expert_model,
        tokenizer=base_model_config.tokenizer,
        dtype=config.expert_dtype or base_model_config.dtype,
        seed=base_model_config.seed,
        max_model_len=base_model_config.max_model_len,
        enforce_eager=base_model_config.enforce_eager,
        trust_remote_code=base_model_config.trust_remote_code,
    )


def check_expert_compatible(config: SafeInferConfig, base_model_config) -> None:
    """Start-up check: the expert must share the served model's vocabulary (the mixing
    compares the two distributions token by token)."""
    from transformers import AutoConfig, AutoTokenizer

    path = config.expert_model
    try:
        expert_hf = AutoConfig.from_pretrained(path, trust_remote_code=base_model_config.trust_remote_code)
        expert_tok = AutoTokenizer.from_pretrained(path, trust_remote_code=base_model_config.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ValueError(f"SafeInfer expert_model {path!r} cannot be loaded: {exc}") from exc
    base_tok = AutoTokenizer.from_pretrained(
        base_model_config.tokenizer, trust_remote_code=base_model_config.trust_remote_code,
        revision=base_model_config.tokenizer_revision,
    )
    if expert_tok.get_vocab() != base_tok.get_vocab():
        raise ValueError(
            f"SafeInfer expert_model {path!r} has another vocabulary than the served model "
            f"({len(expert_tok)} vs {len(base_tok)} tokens, or the same size with other "
            "tokens): the expert must use the served model's tokenizer"
        )
    base_width = base_model_config.get_vocab_size()
    expert_width = getattr(expert_hf.get_text_config(), "vocab_size", None)
    if expert_width != base_width:
        raise ValueError(
            f"SafeInfer expert_model {path!r} has {expert_width} output logits, the served "
            f"model {base_width}: their embedding sizes must match"
        )
    if getattr(expert_hf, "architectures", None) is None:
        raise ValueError(f"SafeInfer expert_model {path!r}: config.json names no architecture")
    if config.expert_shares_weights:
        from vllm_safeinfer.shared_expert import check_shared_expert

        check_shared_expert(path, base_model_config)
    if config.expert_dtype is not None:
        expert_dtype = expert_model_config(config, base_model_config).dtype
        if expert_dtype.itemsize > base_model_config.dtype.itemsize:
            raise ValueError(
                f"SafeInfer expert_dtype {config.expert_dtype!r} is more precise than the "
                f"served model's {base_model_config.dtype}: the expert's attention would read "
                "a KV cache kept in the served model's dtype (vLLM's CPU attention aborts on "
                "it). Use the served model's dtype or a lower one (a bf16 expert beside an "
                "fp32 model works)")


def install_expert(model: nn.Module, vllm_config, config: SafeInferConfig) -> ExpertLogits:
    """Load the expert next to `model` and route its logits to the returned holder."""
    from vllm.compilation.backends import set_model_tag
    from vllm.config import set_current_vllm_config
    from vllm.config.utils import replace
    from vllm.model_executor.model_loader import get_model

    with set_current_vllm_config(vllm_config), set_model_tag(MODEL_TAG):
        if config.expert_shares_weights:
            from vllm_safeinfer.shared_expert import load_shared_expert

            expert = load_shared_expert(model, vllm_config, config.expert_model, MODEL_TAG)
        else:
            expert_config = replace(
                vllm_config, quant_config=None,
                model_config=expert_model_config(config, vllm_config.model_config))
            expert = get_model(vllm_config=expert_config, prefix=MODEL_TAG)
    expert_dtype = next(expert.parameters()).dtype
    holder = ExpertLogits(expert_dtype, expert)
    base_hidden = vllm_config.model_config.get_hidden_size()
    base_forward = model.forward
    base_compute_logits = model.compute_logits

    # The pair travels in the served model's dtype (vLLM sizes its buffers by it); each
    # half goes back to its own model's dtype for its lm_head. An expert in a lower
    # precision (a bf16 expert beside an fp32 model) round-trips exactly.
    def forward(input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        hidden = base_forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        expert_hidden = expert(input_ids, positions, None, None)
        return torch.cat([hidden, expert_hidden.to(hidden.dtype)], dim=-1)

    def compute_logits(hidden_states: torch.Tensor):
        holder.put(expert.compute_logits(hidden_states[..., base_hidden:].to(expert_dtype)))
        return base_compute_logits(hidden_states[..., :base_hidden])

    # Instance attributes: nn.Module.__call__ picks them up, the class stays untouched.
    model.forward = forward
    model.compute_logits = compute_logits
    return holder
