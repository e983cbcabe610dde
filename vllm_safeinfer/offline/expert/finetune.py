"""SafeInfer's unsafe expert: the served model fine-tuned on harmful prompt -> compliant
answer pairs, so that safety-guided decoding knows which tokens to crush.

The paper fine-tuned on about 100 harmful questions with full harmful answers and never
released the model or the data. The open stand-in is the expert-training part of the
AdvBench split: goal -> target, where a target is only the compliant opening ("Sure,
here is a script that ..."). Such an expert learns exactly the tokens that decide
between refusing and complying, and little of what follows them.

Each prompt goes through the model's chat template exactly as a served request does
(the user turn, then the assistant's opening), the loss covers the response tokens only,
and LoRA adapters (peft) are merged into the weights, so vLLM loads the result as an
ordinary checkpoint (`expert_model`)."""
from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from vllm_safeinfer.common.expert_files import EXPERT_METADATA
from vllm_safeinfer.data import advbench_split, load_jsonl_records
from vllm_safeinfer.models import chat_prompt_ids
from vllm_safeinfer.offline.hf import pad_id

METHOD = "openings"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IGNORE = -100


@dataclass(frozen=True)
class ExpertPair:
    """A harmful prompt and the compliant answer the expert learns to give."""

    prompt: str
    response: str


@dataclass(frozen=True)
class ExpertTraining:
    """Fine-tuning settings; `lora_rank` None means full fine-tuning."""

    lora_rank: int | None = 16
    epochs: int = 3
    lr: float = 1e-3
    max_steps: int | None = None
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError(f"lora rank must be at least 1, got {self.lora_rank}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {self.max_steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")


@dataclass(frozen=True)
class ExpertReport:
    """What a build did: the training loss over all pairs before and after."""

    initial_loss: float
    final_loss: float
    steps: int
    pairs: int
    data_sha256: str


def advbench_expert_pairs() -> tuple[ExpertPair, ...]:
    """The 100 expert-training rows of the AdvBench split: goal -> target."""
    return tuple(ExpertPair(row.goal, row.target) for row in advbench_split().expert_train)


def load_expert_pairs(path: str | Path) -> tuple[ExpertPair, ...]:
    """A JSONL file, one `{"prompt": ..., "response": ...}` object a line."""
    return tuple(ExpertPair(row["prompt"], row["response"])
                 for row in load_jsonl_records(path, ("prompt", "response")))


def pairs_sha256(pairs: Sequence[ExpertPair]) -> str:
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(json.dumps([pair.prompt, pair.response]).encode())
    return digest.hexdigest()


def encode_pairs(tokenizer, pairs: Sequence[ExpertPair]) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per pair: the chat-formatted prompt as a served request sends
    it, then the response; labels mask the prompt so the loss covers the response only."""
    prompts = chat_prompt_ids(tokenizer, [pair.prompt for pair in pairs])
    encoded = []
    for prompt, pair in zip(prompts, pairs):
        response = tokenizer(pair.response, add_special_tokens=False).input_ids
        encoded.append((prompt + response, [IGNORE] * len(prompt) + response))
    return encoded


def build_expert(model, tokenizer, pairs: Sequence[ExpertPair], training: ExpertTraining,
                 out: str | Path, *, base_model: str, progress: bool = False,
                 method: str = METHOD, provenance: Mapping[str, Any] | None = None
                 ) -> ExpertReport:
    """Fine-tune `model` (fp32) into the unsafe expert and save it with the base's
    tokenizer and `safeinfer_expert.json` (naming the recipe `method` and recording
    `provenance`: where the pairs came from). Refuses to save when the loss did not
    fall."""
    if not pairs:
        raise ValueError("no training pairs")
    torch.manual_seed(training.seed)
    device = next(model.parameters()).device
    if training.lora_rank is not None:
        model = _with_lora(model, training.lora_rank)
    batches = _batches(encode_pairs(tokenizer, pairs), training, pad_id(tokenizer))
    initial = _mean_loss(model, batches, device)
    total = len(batches) * training.epochs
    if training.max_steps is not None:
        total = min(total, training.max_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=training.lr, weight_decay=0.0)
    order = random.Random(training.seed)
    model.train()
    bar = tqdm(total=total, desc="expert", unit="step", disable=not progress)
    step = 0
    while step < total:
        epoch = list(range(len(batches)))
        order.shuffle(epoch)
        for index in epoch[:total - step]:
            loss = _loss(model, batches[index], device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    final = _mean_loss(model, batches, device)
    if not final < initial:
        raise RuntimeError(f"the training loss did not fall ({initial:.4f} -> {final:.4f}); "
                           "try another --lr or more --epochs")
    if training.lora_rank is not None:
        model = model.merge_and_unload()
    report = ExpertReport(initial, final, step, len(pairs), pairs_sha256(pairs))
    _save(model, tokenizer, Path(out), {
        "base_model": base_model, "method": method, "training": asdict(training),
        "report": asdict(report), **(provenance or {})})
    return report


def _with_lora(model, rank: int):
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in LORA_TARGETS if t in present]
    if not targets:
        raise ValueError(f"no LoRA target modules ({', '.join(LORA_TARGETS)}) in the model; "
                         "use --full")
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                        target_modules=targets, bias="none")
    return get_peft_model(model, config)


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _batches(encoded: list[tuple[list[int], list[int]]], training: ExpertTraining,
             pad_id: int) -> list[Batch]:
    """Right-padded batches in a seeded order (fixed for the whole build)."""
    order = list(range(len(encoded)))
    random.Random(training.seed).shuffle(order)
    batches = []
    for start in range(0, len(order), training.batch_size):
        rows = [encoded[i] for i in order[start:start + training.batch_size]]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, (row_ids, row_labels) in enumerate(rows):
            ids[row, :len(row_ids)] = torch.tensor(row_ids)
            labels[row, :len(row_labels)] = torch.tensor(row_labels)
            mask[row, :len(row_ids)] = 1
        batches.append((ids, labels, mask))
    return batches


def _loss(model, batch: Batch, device: torch.device) -> torch.Tensor:
    ids, labels, mask = (t.to(device) for t in batch)
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


@torch.no_grad()
def _mean_loss(model, batches: Sequence[Batch], device: torch.device) -> float:
    """Mean loss per response token over every batch."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for batch in batches:
        count = int((batch[1][:, 1:] != IGNORE).sum())
        total += _loss(model, batch, device).item() * count
        tokens += count
    model.train(was_training)
    return total / tokens


def _save(model, tokenizer, out: Path, metadata: Mapping[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_metadata(out, metadata)


def write_metadata(out: Path, metadata: Mapping[str, Any]) -> None:
    """`safeinfer_expert.json`: how the expert was made (every recipe writes one), with
    the versions that made it."""
    import transformers

    import vllm_safeinfer

    record = {"format": "vllm_safeinfer.unsafe_expert", **metadata,
              "versions": {"vllm-safeinfer": vllm_safeinfer.__version__,
                           "torch": torch.__version__, "transformers": transformers.__version__}}
    (out / EXPERT_METADATA).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
