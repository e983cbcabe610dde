"""SafeInfer's safety-guided decoding step, the canonical definition.

    C(x)     = max(lp(x), lp_expert(x))            the "Union" operator
    final(x) = (lp(x) - lam * C(x)) / (1 - lam)

with lp = log_softmax over the real vocabulary, in fp32. Tokens the unsafe expert likes
more than the served model are crushed; the others keep their log-probability. The
reference implementation, the logits processor and the Triton kernel's tests all use this
function.
"""
from __future__ import annotations

import torch


def safeinfer_mix(
    logits: torch.Tensor,
    expert_logits: torch.Tensor,
    lam: float | torch.Tensor,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Mix `[..., V]` logits with an expert's; returns log-space scores of the same shape.

    `lam` is a float or a tensor broadcastable to the rows (`[N]` for `[N, V]` logits);
    ids >= `vocab_size` (len(tokenizer): padding rows of the embedding) get -inf, keeping
    the input's width. -inf inputs stay -inf (never NaN). Output dtype is `logits.dtype`.
    """
    width = logits.shape[-1]
    if expert_logits.shape != logits.shape:
        raise ValueError(
            f"expert logits {tuple(expert_logits.shape)} do not match "
            f"logits {tuple(logits.shape)}"
        )
    real = width if vocab_size is None else min(vocab_size, width)
    lp = torch.log_softmax(logits[..., :real].float(), dim=-1)
    lp_expert = torch.log_softmax(expert_logits[..., :real].float(), dim=-1)
    lam_t = torch.as_tensor(lam, dtype=torch.float32, device=logits.device)
    if lam_t.dim() > 0:
        lam_t = lam_t.unsqueeze(-1)
    union = torch.maximum(lp, lp_expert)
    mixed = (lp - lam_t * union) / (1.0 - lam_t)
    # Where lp is -inf the token is impossible; lp - lam*(-inf) would be NaN.
    mixed = torch.where(torch.isneginf(lp), lp, mixed)
    out = torch.full_like(logits, float("-inf"))
    out[..., :real] = mixed.to(logits.dtype)
    return out
