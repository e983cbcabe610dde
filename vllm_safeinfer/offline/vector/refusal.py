"""A model's refusal direction and the model without it (Arditi et al. 2024, "Refusal in
language models is mediated by a single direction").

The direction is the difference of mean residual-stream activations between harmful and
harmless chat-formatted prompts, at one layer and one of the last prompt positions (the
chat template's closing tokens, where the model decides how to answer). Which layer and
position is chosen by measurement, not by how well the means separate: each candidate is
ablated (projected out of the residual stream at every layer) and the one that lowers the
model's refusal score on held-out harmful prompts the most wins. Separation alone picks an
early layer that encodes the prompts' style, whose ablation removes no refusal.

Projecting the chosen direction out of every weight that writes the residual stream
(embeddings, attention output, MLP down projection) gives the same model minus its
refusals: an unsafe expert built from the model's own weights and no harmful answers.
The direction itself, scaled, is a safety vector (`safeinfer vector build --method
refusal-direction`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vllm_safeinfer.common.expert_files import DIRECTION_FILE, DIRECTION_KEY
from vllm_safeinfer.common.vectors import SafetyVector
from vllm_safeinfer.offline.hf import (
    check_fp32,
    left_pad,
    load_model,
    model_device,
    pad_id,
    positions,
)
from vllm_safeinfer.offline.vector.heads import decoder_layers

# First words of a refusal: the refusal score is the log-odds of the first answer token
# being the first token of one of them.
REFUSAL_OPENINGS = ("I", "I'm", "I cannot", "Sorry", "As", "Unfortunately", "No")
# Candidates among the last prompt tokens: each candidate costs a forward pass of the
# validation prompts, so the default is the last token alone (where the probe of a
# safety-tuned 0.5B model found its direction); Arditi et al. search every template token.
POSITIONS = 1
MAX_LAYER_FRACTION = 0.8  # later layers write the answer, not the decision (Arditi)
METHOD = "refusal-direction"


@dataclass(frozen=True)
class RefusalDirection:
    """The mean harmful-minus-harmless `difference` at `layer` (the residual stream
    entering that decoder layer) and `position` (counted back from the prompt's end, -1
    its last token), the mean residual norm there, and the measurement that chose it."""

    difference: torch.Tensor
    layer: int
    position: int
    residual_norm: float
    harmful_sha256: str
    harmless_sha256: str
    scores: dict[str, float] = field(default_factory=dict)
    baseline_score: float = 0.0

    @property
    def direction(self) -> torch.Tensor:
        """The unit direction."""
        return self.difference / self.difference.norm()

    def metadata(self) -> dict[str, str]:
        """What an expert's or a vector's metadata records of it."""
        return {"refusal_layer": str(self.layer), "refusal_position": str(self.position),
                "harmful_sha256": self.harmful_sha256,
                "harmless_sha256": self.harmless_sha256,
                "refusal_score_baseline": repr(self.baseline_score),
                "refusal_scores_ablated": json.dumps(self.scores, sort_keys=True)}


def prompts_sha256(prompts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()


def chat_batches(tokenizer, prompts: Sequence[str], batch_size: int
                 ) -> Iterator[list[list[int]]]:
    from vllm_safeinfer.models import chat_prompt_ids

    ids = chat_prompt_ids(tokenizer, list(prompts))
    for start in range(0, len(ids), batch_size):
        yield ids[start:start + batch_size]


@torch.no_grad()
def mean_activations(model: nn.Module, tokenizer, prompts: Sequence[str], *,
                     last: int = POSITIONS, batch_size: int = 8
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """([layers + 1, last, hidden], [layers + 1]): the mean residual stream entering each
    decoder layer (and leaving the last) at each of the prompts' `last` final positions,
    and its mean norm over every token but each prompt's first (the dose's |h|)."""
    check_fp32(model)
    device = model_device(model)
    total, norms, tokens = None, None, 0
    for rows in chat_batches(tokenizer, prompts, batch_size):
        ids, mask = left_pad(rows, pad_id(tokenizer), device)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                    output_hidden_states=True, use_cache=False)
        hidden = torch.stack(out.hidden_states)
        stacked = hidden[:, :, -last:, :].sum(dim=1)
        counted = mask.clone()
        counted[torch.arange(len(rows)), mask.argmax(-1)] = 0
        batch_norms = (hidden.norm(dim=-1) * counted).sum(dim=(1, 2))
        total = stacked if total is None else total + stacked
        norms = batch_norms if norms is None else norms + batch_norms
        tokens += int(counted.sum())
    return total / len(prompts), norms / tokens


def refusal_token_ids(tokenizer) -> list[int]:
    """The distinct first tokens of `REFUSAL_OPENINGS` in this tokenizer."""
    ids = {tokenizer(text, add_special_tokens=False).input_ids[0] for text in REFUSAL_OPENINGS}
    return sorted(ids)


@torch.no_grad()
def refusal_score(model: nn.Module, tokenizer, prompts: Sequence[str], *,
                  batch_size: int = 8) -> float:
    """Mean log-odds that the first answer token opens a refusal."""
    device = model_device(model)
    scores = []
    for rows in chat_batches(tokenizer, prompts, batch_size):
        ids, mask = left_pad(rows, pad_id(tokenizer), device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                       use_cache=False).logits[:, -1, :].double()
        refusal = torch.zeros(logits.shape[-1], dtype=torch.bool, device=device)
        refusal[refusal_token_ids(tokenizer)] = True
        # log p / (1 - p) as a difference of log-sum-exps: finite however sure the model is.
        scores.append(logits[:, refusal].logsumexp(-1) - logits[:, ~refusal].logsumexp(-1))
    return float(torch.cat(scores).mean())


@contextmanager
def ablated(model: nn.Module, direction: torch.Tensor) -> Iterator[None]:
    """The model with `direction` projected out of the residual stream wherever it is
    written (embeddings, every attention and MLP output), through hooks."""
    unit = direction / direction.norm()

    def project(_module, _inputs, output):
        tensor = output[0] if isinstance(output, tuple) else output
        projected = tensor - (tensor @ unit).unsqueeze(-1) * unit
        return (projected, *output[1:]) if isinstance(output, tuple) else projected

    writers = [model.get_input_embeddings()]
    for layer in decoder_layers(model):
        writers += [layer.self_attn, layer.mlp]
    handles = [module.register_forward_hook(project) for module in writers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def find_refusal_direction(model: nn.Module, tokenizer, harmful: Sequence[str],
                           harmless: Sequence[str], *, validation: Sequence[str],
                           last: int = POSITIONS, batch_size: int = 8,
                           progress: bool = False) -> RefusalDirection:
    """The difference-of-means candidate (layer below `MAX_LAYER_FRACTION` of the depth,
    one of the last `last` prompt positions) whose ablation lowers the refusal score on
    the `validation` harmful prompts the most."""
    from tqdm import tqdm

    if not harmful or not harmless or not validation:
        raise ValueError("the refusal direction needs harmful, harmless and validation prompts")
    harmful_means, harmful_norms = mean_activations(model, tokenizer, harmful, last=last,
                                                    batch_size=batch_size)
    harmless_means, harmless_norms = mean_activations(model, tokenizer, harmless, last=last,
                                                      batch_size=batch_size)
    candidates = harmful_means - harmless_means
    norms = (harmful_norms + harmless_norms) / 2
    depth = len(decoder_layers(model))
    baseline = refusal_score(model, tokenizer, validation, batch_size=batch_size)
    scores: dict[str, float] = {}
    best: tuple[float, int, int] | None = None
    layers = range(1, max(2, int(depth * MAX_LAYER_FRACTION)) + 1)
    grid = [(layer, offset) for layer in layers for offset in range(last)]
    for layer, offset in tqdm(grid, desc="ablating candidates", disable=not progress):
        candidate = candidates[layer, offset]
        if not torch.isfinite(candidate).all() or candidate.norm() == 0:
            continue
        with ablated(model, candidate):
            score = refusal_score(model, tokenizer, validation, batch_size=batch_size)
        scores[f"{layer}:{offset - last}"] = round(score, 4)
        if best is None or score < best[0]:
            best = (score, layer, offset)
    if best is None:
        raise ValueError("no candidate direction: the harmful and harmless means coincide")
    _, layer, offset = best
    return RefusalDirection(candidates[layer, offset].float().cpu(), layer, offset - last,
                            float(norms[layer]), prompts_sha256(harmful),
                            prompts_sha256(harmless), scores, round(baseline, 4))


@torch.no_grad()
def ablate_weights(model: nn.Module, direction: torch.Tensor) -> None:
    """Project `direction` out of every weight that writes the residual stream, in place:
    embeddings (rows), attention output and MLP down projections (output dimension), and
    their biases. A tied output embedding is untied first, so the read-out is unchanged."""
    unit = (direction / direction.norm()).to(next(model.parameters()).dtype)
    if getattr(model.config, "tie_word_embeddings", False):
        output = model.get_output_embeddings()
        output.weight = nn.Parameter(output.weight.detach().clone())
        model.config.tie_word_embeddings = False
    embedding = model.get_input_embeddings().weight
    embedding -= (embedding @ unit).unsqueeze(-1) * unit
    for layer in decoder_layers(model):
        for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
            linear.weight -= unit.unsqueeze(-1) * (unit @ linear.weight)
            if linear.bias is not None:
                linear.bias -= (linear.bias @ unit) * unit


def default_prompts(seed: int = 0) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(harmful, validation, harmless): the expert-training goals cut by the data
    module's split, and as many of the project's harmless instructions, shuffled with
    `seed` so that every topic is represented."""
    from vllm_safeinfer.data import harmless_prompts, refusal_direction_split

    harmful, validation = refusal_direction_split()
    harmless = [p.text for p in harmless_prompts()]
    random.Random(seed).shuffle(harmless)
    return harmful, validation, tuple(harmless[:len(harmful)])


def default_refusal_direction(model: nn.Module, tokenizer, *, seed: int = 0,
                              batch_size: int = 8, progress: bool = False
                              ) -> RefusalDirection:
    """`find_refusal_direction` on `default_prompts(seed)`: what both command-line recipes
    (the ablated expert, the refusal-direction vector) are built from."""
    harmful, validation, harmless = default_prompts(seed)
    return find_refusal_direction(model, tokenizer, harmful, harmless, validation=validation,
                                  batch_size=batch_size, progress=progress)


def save_ablated_expert(model: nn.Module, tokenizer, found: RefusalDirection, out: Path, *,
                        base_model: str) -> None:
    """Project `found` out of `model`'s weights and save it as an expert checkpoint, with
    the direction (`refusal_direction.safetensors`) and `safeinfer_expert.json` recording
    its layer, position, scores, the prompts' hashes and the unablated model's fingerprint
    (what an engine sharing the served model's weights checks)."""
    from safetensors.torch import save_file

    from vllm_safeinfer.common.model_identity import module_fingerprint
    from vllm_safeinfer.offline.expert.finetune import write_metadata

    base_fingerprint = module_fingerprint(model)
    ablate_weights(model, found.direction)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / DIRECTION_FILE).parent.mkdir(exist_ok=True)
    save_file({DIRECTION_KEY: found.difference.contiguous()},
              str(out / DIRECTION_FILE), metadata=found.metadata())
    write_metadata(out, {"base_model": base_model, "base_model_fingerprint": base_fingerprint,
                         "method": "ablate", "refusal_direction": found.metadata()})


def refusal_vector(model: nn.Module, found: RefusalDirection, *, model_name: str,
                   gamma: float = 1.0) -> SafetyVector:
    """The refusal direction as a safety vector: the mean harmful-minus-harmless
    difference added to the output of the decoder layer before `found.layer` (Arditi et
    al. show adding it makes a model refuse), with the residual norm there, so its doses
    compare with the head-ranked vector's."""
    from vllm_safeinfer import __version__
    from vllm_safeinfer.common.model_identity import module_fingerprint

    return SafetyVector(
        vector=found.difference.float().cpu(), layer=found.layer - 1, model=model_name,
        hidden_size=model.config.hidden_size, num_layers=len(decoder_layers(model)),
        heads=(), gamma=gamma, method=METHOD,
        demos_sha256=prompts_sha256([found.harmful_sha256, found.harmless_sha256]),
        version=__version__, residual_norm=found.residual_norm,
        model_fingerprint=module_fingerprint(model))


def refusal_vector_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`safeinfer vector build --method refusal-direction`: the model's refusal direction
    as its safety vector (gamma 1 unless given), saved and described."""
    try:
        model, tokenizer = load_model(args.model, args.device)
        found = default_refusal_direction(model, tokenizer, seed=args.seed,
                                          batch_size=args.batch_size, progress=True)
        vector = refusal_vector(model, found, model_name=args.model,
                                gamma=1.0 if args.gamma is None else args.gamma)
    except (OSError, ValueError) as err:
        parser.error(str(err))
    vector.save(args.out)
    print(f"refusal-direction vector for {vector.model}: layer {vector.layer} (the "
          f"direction at layer {found.layer}'s input, position {found.position}), norm "
          f"{vector.vector.norm():.4f}, residual norm {vector.residual_norm:.4f}, relative "
          f"dose at gamma {vector.gamma:g}: {vector.relative_dose():.4f}; saved {args.out}")
    return 0
