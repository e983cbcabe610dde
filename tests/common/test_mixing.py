"""`safeinfer_mix`, the canonical definition, against a direct element-wise computation."""
from __future__ import annotations

import math

import pytest
import torch

from vllm_safeinfer.common.mixing import safeinfer_mix


def _elementwise(logits: torch.Tensor, expert: torch.Tensor, lam: float, vocab: int) -> torch.Tensor:
    """The formula written out one token at a time, in float64."""
    out = torch.full(logits.shape, -math.inf, dtype=torch.float64)
    for r in range(logits.shape[0]):
        row, erow = logits[r, :vocab].double(), expert[r, :vocab].double()
        lse = math.log(sum(math.exp(x) for x in row.tolist() if x != -math.inf))
        else_ = math.log(sum(math.exp(x) for x in erow.tolist() if x != -math.inf))
        for t in range(vocab):
            lp, lpe = row[t].item() - lse, erow[t].item() - else_
            out[r, t] = -math.inf if lp == -math.inf else (lp - lam * max(lp, lpe)) / (1 - lam)
    return out


@pytest.mark.parametrize("lam", [0.0, 0.5, 0.99])
def test_matches_elementwise(lam):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 40, generator=generator) * 3
    expert = torch.randn(3, 40, generator=generator) * 3
    logits[0, 5] = expert[1, 7] = -math.inf
    logits[2, 9] = expert[2, 9] = -math.inf
    got = safeinfer_mix(logits, expert, lam, vocab_size=36)
    want = _elementwise(logits, expert, lam, 36)
    assert got.shape == logits.shape and got.dtype == logits.dtype
    assert not got.isnan().any()
    assert torch.equal(got.isneginf(), want.isneginf())
    finite = want.isfinite()
    tolerance = 1e-5 / (1 - lam)
    assert torch.allclose(got[finite].double(), want[finite], atol=tolerance, rtol=1e-5)
    assert got[:, 36:].isneginf().all()


def test_lam_zero_is_base_log_probs_and_per_row_lam():
    generator = torch.Generator().manual_seed(1)
    logits, expert = torch.randn(2, 50, generator=generator), torch.randn(2, 50, generator=generator)
    assert torch.allclose(safeinfer_mix(logits, expert, 0.0), torch.log_softmax(logits, -1))
    per_row = safeinfer_mix(logits, expert, torch.tensor([0.0, 0.9]))
    assert torch.allclose(per_row[0], safeinfer_mix(logits[:1], expert[:1], 0.0)[0])
    assert torch.allclose(per_row[1], safeinfer_mix(logits[1:], expert[1:], 0.9)[0])


def test_tokens_the_expert_prefers_are_crushed():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    expert = torch.log(torch.tensor([[0.9, 0.05, 0.05]]))
    mixed = torch.softmax(safeinfer_mix(logits, expert, 0.99), -1)[0]
    assert mixed.argmax() == 1  # token 0, the expert's favourite, loses its lead
    assert mixed[0] < 1e-10


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="do not match"):
        safeinfer_mix(torch.zeros(2, 5), torch.zeros(2, 6), 0.5)
