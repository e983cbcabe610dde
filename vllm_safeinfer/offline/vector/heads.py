"""Which attention heads carry the safe behaviour: each head's mean input to
`self_attn.o_proj` at the last token of the clean prompts, and the heads ranked by their
average indirect effect (AIE) on corrupted prompts. Also the residual stream's norm at
every layer, measured in the same forward passes, so a vector's dose is known."""
from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from vllm_safeinfer.common.vectors import Head
from vllm_safeinfer.offline.hf import check_fp32, left_pad, model_device, pad_id, positions
from vllm_safeinfer.offline.vector.demonstrations import InContextPrompt, require_corrupted


@dataclass(frozen=True)
class HeadEffect:
    """Average indirect effect of patching one head's mean activation."""

    layer: int
    head: int
    effect: float


@dataclass(frozen=True)
class HeadShape:
    """Attention geometry as seen by o_proj: its input is num_heads * head_dim wide,
    whatever the number of KV heads."""

    num_layers: int
    num_heads: int
    head_dim: int
    hidden_size: int


def head_shape(model: nn.Module) -> HeadShape:
    """Read the attention geometry from the o_proj modules, not the config, so
    architectures that set head_dim independently of hidden_size are handled."""
    o_projs = attention_outputs(model)
    num_heads = model.config.get_text_config().num_attention_heads
    width = o_projs[0].in_features
    if width % num_heads:
        raise ValueError(f"o_proj input width {width} is not a multiple of {num_heads} heads")
    return HeadShape(len(o_projs), num_heads, width // num_heads, o_projs[0].out_features)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layers, each with a `self_attn`: what SafeInfer steers."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ValueError(
            f"{type(model).__name__} has no decoder `layers[i].self_attn`: SafeInfer needs "
            "a Llama-style decoder-only model"
        )
    return layers


def attention_outputs(model: nn.Module) -> list[nn.Linear]:
    """Every decoder layer's attention output projection (`self_attn.o_proj`)."""
    o_projs = [getattr(layer.self_attn, "o_proj", None) for layer in decoder_layers(model)]
    if not all(isinstance(o_proj, nn.Linear) for o_proj in o_projs):
        raise ValueError(f"{type(model).__name__} attention has no `o_proj` linear layer")
    return o_projs


def answer_token_id(tokenizer, prompt: str, answer: str) -> int:
    """First token of ` answer` as the model would see it right after `prompt`."""
    prompt_ids = _encode(tokenizer, prompt)
    full_ids = _encode(tokenizer, f"{prompt} {answer}")
    if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        return full_ids[len(prompt_ids)]
    return tokenizer(f" {answer}", add_special_tokens=False).input_ids[0]


@dataclass(frozen=True)
class PromptActivations:
    """What one pass over the clean prompts measures.

    `heads`: mean over prompts of each head's o_proj input at the last token, [layers,
    heads, head_dim]. `residual_norms`: mean L2 norm of each decoder layer's output
    hidden state (the residual stream that steering adds to), [layers], over every real
    token except each prompt's first, whose norm is an attention-sink outlier in most
    models.
    """

    heads: torch.Tensor
    residual_norms: torch.Tensor


@torch.no_grad()
def prompt_activations(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> PromptActivations:
    """Head activations and residual norms over `texts`, fp32. Batches are left-padded,
    with explicit position ids."""
    check_fp32(model)
    if not texts:
        raise ValueError("need at least one prompt")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    shape = head_shape(model)
    device = model_device(model)
    encoded = [_encode(tokenizer, text) for text in texts]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    captured: list[torch.Tensor] = []
    last = torch.empty(len(texts), shape.num_layers, shape.num_heads * shape.head_dim)
    norm_sums = torch.zeros(shape.num_layers, dtype=torch.float64)
    tokens = 0
    counted = torch.empty(0, dtype=torch.bool)  # the batch's tokens the norm covers

    def capture(module: nn.Module, args: tuple) -> None:
        captured.append(args[0][:, -1, :].float().cpu())

    def measure(layer: int):
        def hook(module: nn.Module, args: tuple, output) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            norm_sums[layer] += hidden.float().norm(dim=-1)[counted].sum().double().cpu()

        return hook

    hooks = {o_proj: capture for o_proj in attention_outputs(model)}
    bar = tqdm(total=len(texts), desc="activations", disable=not progress)
    measures = {layer: measure(i) for i, layer in enumerate(decoder_layers(model))}
    with bar, _hooks(hooks, measures):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            ids, mask = left_pad([encoded[i] for i in rows], pad_id(tokenizer), device)
            position_ids = positions(mask)
            counted = mask.bool() & (position_ids > 0)
            tokens += int(counted.sum())
            captured.clear()
            model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                  use_cache=False, logits_to_keep=1)
            last[rows] = torch.stack(captured, dim=1)
            bar.update(len(rows))
    if tokens == 0:
        raise ValueError("the prompts have one token each: no residual norm to measure")
    heads = last.mean(dim=0).view(shape.num_layers, shape.num_heads, shape.head_dim)
    return PromptActivations(heads, (norm_sums / tokens).float())


@torch.no_grad()
def rank_heads(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[InContextPrompt],
    mean_activations: torch.Tensor,
    *,
    head_batch_size: int = 128,
    progress: bool = False,
) -> tuple[HeadEffect, ...]:
    """Every (layer, head) once, sorted by average indirect effect (ties by index).

    The effect of a head is the mean over `prompts` of P(first answer token) on the
    corrupted prompt with that head's mean activation written into the last token's
    o_proj input, minus the same probability unpatched. Each corrupted prompt runs once
    without its last token; then only the last token is recomputed, as one copy per
    patched head in a single forward over that KV cache. The copies sit side by side as
    query positions sharing one position id, and a 4-D mask lets each see the prompt and
    itself only: no copy of the cache per head, which would dominate the cost.
    """
    check_fp32(model)
    shape = head_shape(model)
    expected = (shape.num_layers, shape.num_heads, shape.head_dim)
    if tuple(mean_activations.shape) != expected:
        raise ValueError(
            f"mean activations have shape {tuple(mean_activations.shape)}, expected {expected}"
        )
    if not prompts:
        raise ValueError("ranking needs at least one prompt")
    require_corrupted(prompts)
    if head_batch_size < 1:
        raise ValueError(f"head_batch_size must be positive, got {head_batch_size}")
    device = model_device(model)
    means = mean_activations.to(device=device, dtype=torch.float32)
    heads: list[Head | None] = [None] + [
        (layer, head) for layer in range(shape.num_layers) for head in range(shape.num_heads)
    ]
    chunks = [heads[i : i + head_batch_size] for i in range(0, len(heads), head_batch_size)]
    o_projs = attention_outputs(model)
    vocab = len(tokenizer)
    total = torch.zeros(len(heads) - 1, dtype=torch.float64)
    bar = tqdm(total=len(prompts) * (len(heads) - 1), desc="ranking heads", disable=not progress)
    for prompt in prompts:
        ids = torch.tensor([_encode(tokenizer, prompt.corrupted)], device=device)
        target = answer_token_id(tokenizer, prompt.corrupted, prompt.answer)
        prefix = model(input_ids=ids[:, :-1], use_cache=True).past_key_values
        _check_sliding_window(prefix, ids.shape[1])
        probs = []
        for chunk in chunks:
            copies = len(chunk)
            with _hooks(_patch_hooks(chunk, means, shape, o_projs)):
                logits = model(
                    input_ids=ids[:, -1:].expand(1, copies),
                    attention_mask=_copies_mask(ids.shape[1] - 1, copies, device),
                    position_ids=torch.full((1, copies), ids.shape[1] - 1, device=device),
                    past_key_values=copy.deepcopy(prefix),
                    use_cache=True,
                ).logits
            probs.append(torch.softmax(logits[0, :, :vocab].float(), dim=-1)[:, target].cpu())
            bar.update(sum(item is not None for item in chunk))
        row_probs = torch.cat(probs).double()
        total += row_probs[1:] - row_probs[0]
    bar.close()
    effects = (total / len(prompts)).tolist()
    ranked = [
        HeadEffect(layer, head, effects[i])
        for i, (layer, head) in enumerate(h for h in heads if h is not None)
    ]
    return tuple(sorted(ranked, key=lambda e: (-e.effect, e.layer, e.head)))


def _check_sliding_window(cache, length: int) -> None:
    """The copies' mask shows each one the whole prompt, which matches sliding-window
    layers only while the prompt fits in their window."""
    windows = [layer.sliding_window for layer in cache.layers if getattr(layer, "is_sliding", 0)]
    if windows and length > min(windows):
        raise ValueError(
            f"a ranking prompt of {length} tokens exceeds the model's sliding window of "
            f"{min(windows)} tokens: use fewer shots"
        )


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text).input_ids)


def _copies_mask(prefix: int, copies: int, device: torch.device) -> torch.Tensor:
    """Additive [1, 1, copies, prefix + copies] mask: copy j sees the prefix and itself."""
    mask = torch.full((copies, prefix + copies), torch.finfo(torch.float32).min, device=device)
    mask[:, :prefix] = 0
    mask[:, prefix:].fill_diagonal_(0)
    return mask[None, None]


def _patch_hooks(
    chunk: Sequence[Head | None], means: torch.Tensor, shape: HeadShape, o_projs: list[nn.Linear]
) -> dict[nn.Module, object]:
    """Pre-hooks writing copy j's head mean activation into its layer's o_proj input
    (None: the unpatched copy)."""
    by_layer: dict[int, list[tuple[int, int]]] = {}
    for position, item in enumerate(chunk):
        if item is not None:
            by_layer.setdefault(item[0], []).append((position, item[1]))

    def make(layer: int, pairs: list[tuple[int, int]]):
        positions = torch.tensor([position for position, _ in pairs], device=means.device)
        heads = torch.tensor([head for _, head in pairs], device=means.device)

        def patch(module: nn.Module, args: tuple) -> tuple:
            x = args[0].clone()
            view = x.view(x.shape[0], x.shape[1], shape.num_heads, shape.head_dim)
            view[0, positions, heads] = means[layer, heads].to(x.dtype)
            return (x, *args[1:])

        return patch

    return {o_projs[layer]: make(layer, pairs) for layer, pairs in by_layer.items()}


@contextmanager
def _hooks(pre: dict[nn.Module, object], forward: dict[nn.Module, object] | None = None
           ) -> Iterator[None]:
    """Forward pre-hooks and forward hooks, removed on exit whatever happens."""
    handles = [module.register_forward_pre_hook(hook) for module, hook in pre.items()]
    handles += [module.register_forward_hook(hook) for module, hook in (forward or {}).items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
