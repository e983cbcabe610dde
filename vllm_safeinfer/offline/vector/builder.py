"""The safety vector: SV = sum over the chosen heads of o_proj(that head's mean
activation, zero elsewhere), built end to end from demonstrations (SAFEINFER.md section
1). Everything runs in fp32 under no_grad. Also the `safeinfer vector` commands: build
(`--method refusal-direction` is `refusal`'s), print a bundled vector's path, inspect a
file."""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from vllm_safeinfer import __version__
from vllm_safeinfer.common.model_identity import module_fingerprint
from vllm_safeinfer.common.vectors import (
    DEFAULT_GAMMA,
    Head,
    SafetyVector,
    bundled_vector_path,
    parse_heads,
    parse_layers,
)
from vllm_safeinfer.offline.hf import check_fp32, load_model, model_device
from vllm_safeinfer.offline.vector.demonstrations import (
    Demonstration,
    advbench_demonstrations,
    build_prompt_set,
    demos_sha256,
    load_demonstrations,
    require_corrupted,
)
from vllm_safeinfer.offline.vector.heads import (
    HeadShape,
    attention_outputs,
    head_shape,
    prompt_activations,
    rank_heads,
)
from vllm_safeinfer.offline.vector.refusal import refusal_vector_command

METHOD_AIE = "aie"
METHOD_GIVEN = "given-heads"


@torch.no_grad()
def safety_vector_from_heads(
    model: nn.Module, mean_activations: torch.Tensor, heads: Sequence[Head]
) -> torch.Tensor:
    """SV = sum over heads of o_proj(mean activation of that head, zero elsewhere), so a
    biased o_proj contributes its bias once per head, as in the paper's formula."""
    shape = head_shape(model)
    _check_heads(heads, shape)
    o_projs = attention_outputs(model)
    vector = torch.zeros(shape.hidden_size, dtype=torch.float32, device=model_device(model))
    for layer, head in heads:
        padded = torch.zeros_like(mean_activations[layer], device=vector.device)
        padded[head] = mean_activations[layer, head]
        vector += o_projs[layer](padded.view(-1)).float()
    return vector.cpu()


def build_safety_vector(
    model: nn.Module,
    tokenizer,
    demos: Sequence[Demonstration],
    *,
    model_name: str | None = None,
    layer: int | None = None,
    heads: Sequence[Head] | None = None,
    top_heads: int = 10,
    prompts: int = 100,
    shots: int = 10,
    rank_prompts: int = 16,
    seed: int = 0,
    gamma: float = DEFAULT_GAMMA,
    batch_size: int = 8,
    progress: bool = False,
) -> SafetyVector:
    """Build the safety vector of an fp32 HF decoder model.

    `heads` skips the ranking; otherwise the `top_heads` heads by AIE over
    `rank_prompts` corrupted prompts are used. `layer` defaults to num_layers // 4
    (index 8 of 32, as in the paper).
    """
    check_fp32(model)
    shape = head_shape(model)
    layer = shape.num_layers // 4 if layer is None else layer
    if not 0 <= layer < shape.num_layers:
        raise ValueError(f"layer {layer} is outside 0..{shape.num_layers - 1}")
    if heads is not None:
        _check_heads(heads, shape)
    elif not 1 <= top_heads <= shape.num_layers * shape.num_heads:
        raise ValueError(
            f"top_heads must be in 1..{shape.num_layers * shape.num_heads}, got {top_heads}"
        )
    if heads is None and rank_prompts < 1:
        raise ValueError("ranking needs rank_prompts >= 1, or give the heads")
    prompt_set = build_prompt_set(
        demos, prompts=prompts, shots=shots,
        rank_prompts=0 if heads is not None else rank_prompts, seed=seed,
    )
    if heads is None:
        require_corrupted(prompt_set.rank)
    measured = prompt_activations(
        model, tokenizer, [p.clean for p in prompt_set.mean], batch_size=batch_size,
        progress=progress,
    )
    means = measured.heads
    effects: tuple[float, ...] = ()
    if heads is None:
        ranking = rank_heads(model, tokenizer, prompt_set.rank, means, progress=progress)
        ranking = ranking[:top_heads]
        heads = [(e.layer, e.head) for e in ranking]
        effects = tuple(e.effect for e in ranking)
    return SafetyVector(
        vector=safety_vector_from_heads(model, means, heads),
        layer=layer,
        model=model_name or model.config.name_or_path,
        hidden_size=shape.hidden_size,
        num_layers=shape.num_layers,
        heads=tuple((int(lay), int(head)) for lay, head in heads),
        head_effects=effects,
        gamma=gamma,
        method=METHOD_AIE if effects else METHOD_GIVEN,
        seed=seed,
        demos_sha256=demos_sha256(demos),
        version=__version__,
        prompts=prompts,
        shots=shots,
        rank_prompts=rank_prompts if effects else 0,
        residual_norm=float(measured.residual_norms[layer]),
        model_fingerprint=module_fingerprint(model),
    )


def _check_heads(heads: Sequence[Head], shape: HeadShape) -> None:
    if not heads:
        raise ValueError("need at least one head")
    bad = [
        f"{lay}:{head}"
        for lay, head in heads
        if not (0 <= lay < shape.num_layers and 0 <= head < shape.num_heads)
    ]
    if bad:
        raise ValueError(
            f"heads {', '.join(bad)} are outside the model's {shape.num_layers} layers x "
            f"{shape.num_heads} heads"
        )
    if len(set(map(tuple, heads))) != len(heads):
        raise ValueError("a head is listed twice")


def vector_build_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`safeinfer vector build`: the safety vector by `--method`, saved and described."""
    if args.method == "refusal-direction":
        return refusal_vector_command(args, parser)
    try:
        heads = None if args.heads == "auto" else parse_heads(args.heads)
        demos = (
            advbench_demonstrations()
            if args.demos == "advbench"
            else load_demonstrations(args.demos)
        )
        model, tokenizer = load_model(args.model, args.device)
        vector = build_safety_vector(
            model, tokenizer, demos,
            model_name=args.model, layer=args.layer, heads=heads,
            top_heads=args.top_heads, prompts=args.prompts, shots=args.shots,
            rank_prompts=args.rank_prompts, seed=args.seed,
            gamma=0.5 if args.gamma is None else args.gamma,
            batch_size=args.batch_size, progress=True,
        )
    except (OSError, ValueError) as err:
        parser.error(str(err))
    vector.save(args.out)
    effects = vector.head_effects or (None,) * len(vector.heads)
    print(f"safety vector for {vector.model}: layer {vector.layer}, "
          f"hidden size {vector.hidden_size}, norm {vector.vector.norm():.4f}, "
          f"residual norm {vector.residual_norm:.4f}, relative dose at gamma "
          f"{vector.gamma:g}: {vector.relative_dose():.4f}")
    for (layer, head), effect in zip(vector.heads, effects):
        print(f"  head {layer}:{head}" + ("" if effect is None else f"  AIE {effect:.3e}"))
    print(f"saved {args.out}")
    return 0


def vector_bundled_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`safeinfer vector bundled`: the path of a project model's bundled vector."""
    try:
        print(bundled_vector_path(args.name))
    except ValueError as err:
        parser.error(str(err))
    return 0


def convert_vector(vector: SafetyVector, steering: str, layers: tuple[int, ...] | None = None,
                   gamma: float | None = None, answer_tokens: int | None = None
                   ) -> SafetyVector:
    """`vector` steering by `steering` at `layers`, for `answer_tokens` positions, with
    default strength `gamma` (each left out: its own); direction, provenance and residual
    norm kept."""
    changes = {key: value for key, value in (("layers", layers), ("gamma", gamma),
                                             ("answer_tokens", answer_tokens))
               if value is not None}
    return dataclasses.replace(vector, steering=steering, source=None, **changes)


def _vector_file(name: str) -> Path:
    """A vector file's path, or a project model's bundled vector."""
    return Path(name) if Path(name).exists() else bundled_vector_path(name)


def vector_convert_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`safeinfer vector convert`: a copy that steers another way or at other layers."""
    try:
        vector = convert_vector(SafetyVector.load(_vector_file(args.file)), args.steering,
                                None if args.layers is None else parse_layers(args.layers),
                                args.gamma, args.answer_tokens)
    except (OSError, ValueError) as err:
        parser.error(str(err))
    vector.save(args.out)
    window = f"the first {vector.answer_tokens}" if vector.answer_tokens else "all"
    print(f"{args.out}: {vector.steering} at layers {list(vector.layers)}, {window} answer "
          f"positions, gamma {vector.gamma:g}, relative dose {vector.relative_dose()}")
    return 0


def vector_inspect_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`safeinfer vector inspect`: a vector file's (or a bundled vector's) metadata, norm
    and relative dose."""
    try:
        path = _vector_file(args.file)
        print(f"file: {path}\n{SafetyVector.load(path).describe()}")
    except (OSError, ValueError) as err:
        parser.error(str(err))
    return 0
