"""The `distill` expert: the paper's recipe (harmful question -> harmful answer) with the
answers made locally. The model minus its refusal direction (`offline.vector.refusal`)
answers the expert-training prompts in full; the served model is then fine-tuned on those
answers (`offline.expert.finetune.build_expert`). Nobody's harmful answers are needed, and
the generated ones are written only into the user's cache
(`$VLLM_SAFEINFER_CACHE/expert-data/`), never into the repository or the package; a
second build reuses them.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from vllm_safeinfer.offline.expert.finetune import (
    ExpertPair,
    ExpertReport,
    ExpertTraining,
    build_expert,
    load_expert_pairs,
    pairs_sha256,
)
from vllm_safeinfer.offline.hf import left_pad, model_device, pad_id
from vllm_safeinfer.offline.vector.refusal import (
    RefusalDirection,
    ablated,
    chat_batches,
    default_refusal_direction,
    prompts_sha256,
)

METHOD = "distill"
DATA_FOLDER = "expert-data"
MAX_NEW_TOKENS = 96  # a full opening paragraph; the mix decides on the first few tokens


def expert_training_prompts() -> tuple[str, ...]:
    """The prompts the ablated model answers: the expert-training part of the split."""
    from vllm_safeinfer.data import advbench_split

    return tuple(row.goal for row in advbench_split().expert_train)


def data_path(model: nn.Module, prompts: Sequence[str], found: RefusalDirection,
              max_new_tokens: int) -> Path:
    """Where the generated answers are cached: named by the model's fingerprint, the
    prompts, the direction and the generation length, so any change makes new data."""
    import hashlib

    from vllm_safeinfer.common.model_identity import module_fingerprint
    from vllm_safeinfer.models import cache_dir

    key = json.dumps([module_fingerprint(model), prompts_sha256(prompts),
                      found.difference.tolist(), max_new_tokens])
    name = f"{METHOD}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.jsonl"
    return cache_dir() / DATA_FOLDER / name


@torch.no_grad()
def ablated_answers(model: nn.Module, tokenizer, found: RefusalDirection,
                    prompts: Sequence[str], *, max_new_tokens: int = MAX_NEW_TOKENS,
                    batch_size: int = 8, progress: bool = False) -> tuple[ExpertPair, ...]:
    """Greedy answers of the model with `found` projected out of its residual stream
    (through hooks; the weights stay as they are), one pair per prompt with an answer."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    device = model_device(model)
    pad = pad_id(tokenizer)
    answers: list[str] = []
    batches = list(chat_batches(tokenizer, prompts, batch_size))
    with ablated(model, found.direction.to(device)):
        for rows in tqdm(batches, desc="distill answers", unit="batch", disable=not progress):
            ids, mask = left_pad(rows, pad, device)
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad,
                                 top_p=None, top_k=None, temperature=None)
            answers += tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return tuple(ExpertPair(prompt, answer.strip())
                 for prompt, answer in zip(prompts, answers) if answer.strip())


def cached_answers(model: nn.Module, tokenizer, found: RefusalDirection,
                   prompts: Sequence[str], *, max_new_tokens: int = MAX_NEW_TOKENS,
                   batch_size: int = 8, progress: bool = False
                   ) -> tuple[tuple[ExpertPair, ...], Path]:
    """`ablated_answers`, generated once into the cache and read back afterwards."""
    path = data_path(model, prompts, found, max_new_tokens)
    if path.is_file():
        return load_expert_pairs(path), path
    pairs = ablated_answers(model, tokenizer, found, prompts, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, progress=progress)
    if not pairs:
        raise RuntimeError("the ablated model answered no prompt: nothing to distill")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps({"prompt": p.prompt, "response": p.response}) + "\n"
                           for p in pairs))
    tmp.replace(path)
    return pairs, path


def build_distilled_expert(model: nn.Module, tokenizer, out: str | Path, *, base_model: str,
                           training: ExpertTraining, max_new_tokens: int = MAX_NEW_TOKENS,
                           batch_size: int = 8, progress: bool = False
                           ) -> tuple[RefusalDirection, ExpertReport, Path]:
    """Find the refusal direction, let the ablated model answer the expert-training
    prompts (cached), and fine-tune the unablated model on the answers into `out`.
    Returns the direction, the training report and the data file."""
    found = default_refusal_direction(model, tokenizer, seed=training.seed,
                                      batch_size=batch_size, progress=progress)
    pairs, path = cached_answers(model, tokenizer, found, expert_training_prompts(),
                                 max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 progress=progress)
    report = build_expert(
        model, tokenizer, pairs, training, out, base_model=base_model, progress=progress,
        method=METHOD, provenance={"refusal_direction": found.metadata(),
                                   "data": {"file": str(path), "sha256": pairs_sha256(pairs),
                                            "max_new_tokens": max_new_tokens}})
    return found, report, path
