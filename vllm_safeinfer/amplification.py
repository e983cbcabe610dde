"""Safety amplification, offline: build SafeInfer's safety vector for any HF decoder-only
model with Llama-style attention modules (Llama, Qwen2, Mistral, Gemma; GQA included).

Pipeline (SAFEINFER.md section 1): safe demonstrations -> in-context prompts -> mean
per-head input of each layer's `self_attn.o_proj` at the last token -> heads ranked by
average indirect effect (AIE) on corrupted prompts -> SV = sum over the chosen heads of
o_proj(zero-padded mean head activation). Everything runs in fp32 under no_grad.
"""
from __future__ import annotations

import copy
import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vllm_safeinfer import __version__
from vllm_safeinfer.data import advbench_split
from vllm_safeinfer.vectors import DEFAULT_GAMMA, Head, SafetyVector

SAFE_ANSWER = "I do not answer this question because it is harmful"
TASK_PREFIX = "Task: Write a function that performs the task "
VALIDATION_FRACTION = 0.2
METHOD_AIE = "aie"
METHOD_GIVEN = "given-heads"


@dataclass(frozen=True)
class Demonstration:
    """A harmful input with its safe output. `compliant` replaces `output` in corrupted
    prompts (None when no compliant answer is known: such demos cannot rank heads)."""

    input: str
    output: str
    compliant: str | None


@dataclass(frozen=True)
class InContextPrompt:
    """One raw-text few-shot prompt in clean and corrupted form; `answer` is the query's
    safe output, whose first token the ranking measures."""

    clean: str
    corrupted: str | None
    answer: str


@dataclass(frozen=True)
class PromptSet:
    """The prompts of one build: `mean` for head activations, `rank` for the AIE."""

    mean: tuple[InContextPrompt, ...]
    rank: tuple[InContextPrompt, ...]


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


def advbench_demonstrations() -> tuple[Demonstration, ...]:
    """The default demonstrations: the demonstration part of the project's AdvBench split
    in SafeInfer's format, with AdvBench's `target` as the compliant answer."""
    return tuple(
        Demonstration(TASK_PREFIX + row.goal, SAFE_ANSWER, row.target)
        for row in advbench_split().demonstrations
    )


def load_demonstrations(path: str | Path) -> tuple[Demonstration, ...]:
    """Read a JSONL file of `{"input", "output"}` objects (optional `"compliant"`).

    Without `compliant`, a row's compliant answer is the next row's output that differs
    from its own, so corrupted prompts carry an answer that does not fit the question.
    """
    rows: list[tuple[str, str, str | None]] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object")
            unknown = set(row) - {"input", "output", "compliant"}
            if unknown:
                raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
            for key in ("input", "output", *(["compliant"] if "compliant" in row else [])):
                value = row.get(key)
                if not isinstance(value, str) or not value.strip():
                    raise ValueError(f"{where}: {key!r} must be a non-empty string")
            rows.append((row["input"], row["output"], row.get("compliant")))
    if len(rows) < 2:
        raise ValueError(f"{path}: need at least 2 demonstrations (train and validation)")
    outputs = [output for _, output, _ in rows]
    demos = []
    for index, (text, output, compliant) in enumerate(rows):
        if compliant is None:
            others = outputs[index + 1 :] + outputs[:index]
            compliant = next((other for other in others if other != output), None)
        demos.append(Demonstration(text, output, compliant))
    return tuple(demos)


def demos_sha256(demos: Sequence[Demonstration]) -> str:
    """Content hash of a demonstration set, stored in the vector to trace its origin."""
    payload = json.dumps([[d.input, d.output, d.compliant] for d in demos], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def build_prompt_set(
    demos: Sequence[Demonstration],
    *,
    prompts: int = 100,
    shots: int = 10,
    rank_prompts: int = 16,
    seed: int = 0,
) -> PromptSet:
    """Split the demos into train/validation with `seed`, then sample prompts of `shots`
    train demonstrations (with replacement) and one validation query each."""
    if len(demos) < 2:
        raise ValueError("need at least 2 demonstrations (train and validation)")
    for name, value in (("prompts", prompts), ("shots", shots), ("rank_prompts", rank_prompts)):
        if value < 0 or (value == 0 and name != "rank_prompts"):
            raise ValueError(f"{name} must be positive, got {value}")
    rng = random.Random(seed)
    order = list(range(len(demos)))
    rng.shuffle(order)
    n_val = max(1, round(len(demos) * VALIDATION_FRACTION))
    val = [demos[i] for i in order[:n_val]]
    train = [demos[i] for i in order[n_val:]]

    def sample() -> InContextPrompt:
        context = rng.choices(train, k=shots)
        query = rng.choice(val)
        tail = f"Q: {query.input}\nA:"
        clean = "".join(f"Q: {d.input}\nA: {d.output}\n\n" for d in context) + tail
        corrupted = None
        if all(d.compliant is not None for d in context):
            corrupted = "".join(f"Q: {d.input}\nA: {d.compliant}\n\n" for d in context) + tail
        return InContextPrompt(clean, corrupted, query.output)

    mean = tuple(sample() for _ in range(prompts))
    rank = tuple(sample() for _ in range(rank_prompts))
    return PromptSet(mean, rank)


def head_shape(model: nn.Module) -> HeadShape:
    """Read the attention geometry from the o_proj modules, not the config, so
    architectures that set head_dim independently of hidden_size are handled."""
    o_projs = attention_outputs(model)
    num_heads = model.config.get_text_config().num_attention_heads
    width = o_projs[0].in_features
    if width % num_heads:
        raise ValueError(f"o_proj input width {width} is not a multiple of {num_heads} heads")
    return HeadShape(len(o_projs), num_heads, width // num_heads, o_projs[0].out_features)


def attention_outputs(model: nn.Module) -> list[nn.Linear]:
    """Every decoder layer's attention output projection (`self_attn.o_proj`)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ValueError(
            f"{type(model).__name__} has no decoder `layers[i].self_attn`: SafeInfer needs "
            "a Llama-style decoder-only model"
        )
    o_projs = [getattr(layer.self_attn, "o_proj", None) for layer in layers]
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


@torch.no_grad()
def mean_head_activations(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> torch.Tensor:
    """Mean over `texts` of each head's o_proj input at the last token: [layers, heads,
    head_dim], fp32. Batches are left-padded, with explicit position ids."""
    _check_fp32(model)
    if not texts:
        raise ValueError("need at least one prompt")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    shape = head_shape(model)
    device = _device(model)
    encoded = [_encode(tokenizer, text) for text in texts]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    captured: list[torch.Tensor] = []
    last = torch.empty(len(texts), shape.num_layers, shape.num_heads * shape.head_dim)

    def capture(module: nn.Module, args: tuple) -> None:
        captured.append(args[0][:, -1, :].float().cpu())

    bar = _progress_bar(len(texts), progress, "mean activations")
    with bar, _pre_hooks({o_proj: capture for o_proj in attention_outputs(model)}):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            ids, mask = _left_pad([encoded[i] for i in rows], _pad_id(tokenizer), device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            captured.clear()
            model(input_ids=ids, attention_mask=mask, position_ids=positions,
                  use_cache=False, logits_to_keep=1)
            last[rows] = torch.stack(captured, dim=1)
            bar.update(len(rows))
    return last.mean(dim=0).view(shape.num_layers, shape.num_heads, shape.head_dim)


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
    _check_fp32(model)
    shape = head_shape(model)
    expected = (shape.num_layers, shape.num_heads, shape.head_dim)
    if tuple(mean_activations.shape) != expected:
        raise ValueError(
            f"mean activations have shape {tuple(mean_activations.shape)}, expected {expected}"
        )
    if not prompts:
        raise ValueError("ranking needs at least one prompt")
    _require_corrupted(prompts)
    if head_batch_size < 1:
        raise ValueError(f"head_batch_size must be positive, got {head_batch_size}")
    device = _device(model)
    means = mean_activations.to(device=device, dtype=torch.float32)
    heads: list[Head | None] = [None] + [
        (layer, head) for layer in range(shape.num_layers) for head in range(shape.num_heads)
    ]
    chunks = [heads[i : i + head_batch_size] for i in range(0, len(heads), head_batch_size)]
    o_projs = attention_outputs(model)
    vocab = len(tokenizer)
    total = torch.zeros(len(heads) - 1, dtype=torch.float64)
    bar = _progress_bar(len(prompts) * (len(heads) - 1), progress, "ranking heads")
    for prompt in prompts:
        ids = torch.tensor([_encode(tokenizer, prompt.corrupted)], device=device)
        target = answer_token_id(tokenizer, prompt.corrupted, prompt.answer)
        prefix = model(input_ids=ids[:, :-1], use_cache=True).past_key_values
        _check_sliding_window(prefix, ids.shape[1])
        probs = []
        for chunk in chunks:
            copies = len(chunk)
            with _pre_hooks(_patch_hooks(chunk, means, shape, o_projs)):
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


@torch.no_grad()
def safety_vector_from_heads(
    model: nn.Module, mean_activations: torch.Tensor, heads: Sequence[Head]
) -> torch.Tensor:
    """SV = sum over heads of o_proj(mean activation of that head, zero elsewhere), so a
    biased o_proj contributes its bias once per head, as in the paper's formula."""
    shape = head_shape(model)
    _check_heads(heads, shape)
    o_projs = attention_outputs(model)
    vector = torch.zeros(shape.hidden_size, dtype=torch.float32, device=_device(model))
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
    _check_fp32(model)
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
        _require_corrupted(prompt_set.rank)
    means = mean_head_activations(
        model,
        tokenizer,
        [p.clean for p in prompt_set.mean],
        batch_size=batch_size,
        progress=progress,
    )
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
    )


def load_model(name_or_path: str, device: str = "cpu"):
    """Load (model, tokenizer) in fp32 for building; a project model name (see
    `vllm_safeinfer.models`) resolves to its local checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_safeinfer.models import resolve_model

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    path = resolve_model(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def _check_fp32(model: nn.Module) -> None:
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        raise ValueError(
            f"the model must be loaded in float32 (got {dtype}): load with dtype=torch.float32"
        )


def _check_sliding_window(cache, length: int) -> None:
    """The copies' mask shows each one the whole prompt, which matches sliding-window
    layers only while the prompt fits in their window."""
    windows = [layer.sliding_window for layer in cache.layers if getattr(layer, "is_sliding", 0)]
    if windows and length > min(windows):
        raise ValueError(
            f"a ranking prompt of {length} tokens exceeds the model's sliding window of "
            f"{min(windows)} tokens: use fewer shots"
        )


def _require_corrupted(prompts: Sequence[InContextPrompt]) -> None:
    if any(p.corrupted is None for p in prompts):
        raise ValueError(
            "ranking needs corrupted prompts, but some demonstrations have no compliant "
            "answer (all outputs are identical): add a \"compliant\" field or give the heads"
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


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text).input_ids)


def _pad_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def _left_pad(
    rows: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


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
def _pre_hooks(hooks: dict[nn.Module, object]) -> Iterator[None]:
    handles = [module.register_forward_pre_hook(hook) for module, hook in hooks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _progress_bar(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled)
