"""HF transformers plumbing shared by the offline tools, the reference and the tests: one
model loader and one left-padding helper."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def load_model(
    name_or_path: str | Path, device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """(model, tokenizer) in eval mode; a project model name (see `vllm_safeinfer.models`)
    resolves to its local checkpoint. fp32 by default: the builders need it."""
    return load_causal_lm(name_or_path, device, dtype), load_tokenizer(name_or_path)


def load_causal_lm(
    name_or_path: str | Path, device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    from transformers import AutoModelForCausalLM

    from vllm_safeinfer.models import resolve_model

    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available")
    path = resolve_model(str(name_or_path))
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def load_tokenizer(name_or_path: str | Path):
    from transformers import AutoTokenizer

    from vllm_safeinfer.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(str(name_or_path)))


def pad_id(tokenizer) -> int:
    """The tokenizer's pad token, else its eos, else 0: padded positions are masked, so
    any id in the vocabulary will do."""
    return next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)


def left_pad(
    rows: list[list[int]], pad: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), each [rows, longest]: rows end together, so the last
    position of every row is its last real token."""
    if not rows or any(not row for row in rows):
        raise ValueError("left_pad needs non-empty rows")
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted from each row's first real token, so a left-padded row
    computes what it would alone."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def check_fp32(model: nn.Module) -> None:
    """The offline builders measure small differences (indirect effects, losses) that
    half precision would drown."""
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        raise ValueError(
            f"the model must be loaded in float32 (got {dtype}): load with dtype=torch.float32"
        )


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
