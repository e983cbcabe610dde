"""An `ablate` expert that shares the served model's weights (`expert_shares_weights`),
run inside the served model's own forward.

The `ablate` recipe's expert is the served model with its refusal direction projected out
of every residual write. Inside the worker it needs no weights of its own, nor a forward
of its own: its rows ride in the served model's forward. Each step the rows the expert
must run on (`expert_rows.py`) are appended to the batch, so every shared module (the
embedding, norms, QKV, output and MLP projections, the final norm) reads the weights once
for both; each attention layer sends the served rows to the served model's paged KV cache
and the expert's rows to an attention layer of the expert's own (its own KV cache, its own
metadata: `fused_attention`), and the direction is projected out of what the embedding,
each attention block and each MLP write into the expert's rows (`expert_ablate_`). The
LM head then runs once over the sampled rows of both models (`expert.py`). This computes what the materialised checkpoint
computes, `(I - uu^T) W x` either way, with the served model's weights read once a step.

Both ops read the step's split (`FusedRows`: rows below `served` are the served model's)
from this process's `FUSED_ROWS`, set around the forward; they are opaque to
torch.compile, so a compiled graph holds them as calls and the split stays a Python value
of the step. The steering and probe ops leave the appended rows alone (they are past the
batch's last query row, where CUDA-graph padding lives).

At start-up the expert folder must be an `ablate` expert (`safeinfer expert build
--method ablate`) made from the served model's own weights: its recorded fingerprint of
the unablated model is compared with the served checkpoint's.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vllm_safeinfer.common.expert_files import DIRECTION_FILE, DIRECTION_KEY
from vllm_safeinfer.kernels.ops import mutating_op

_SCALE_ATTRIBUTES = ("_k_scale_float", "_v_scale_float", "_q_scale_float")


@dataclass
class FusedRows:
    """The split of the forward in flight (`served`: None outside a fused forward) and
    what the fused forwards ran, for tests and benchmarks."""

    served: int | None = None
    forwards: int = 0  # fused forwards run (one per step)
    expert_rows: int = 0  # expert rows they held, all together
    forwards_without_expert: int = 0  # of them, forwards that held no expert row


FUSED_ROWS = FusedRows()  # this worker process's


@mutating_op("expert_ablate_", ("out",))
def expert_ablate_(out: torch.Tensor, direction: torch.Tensor) -> None:
    """Project the unit `direction` out of the expert's rows of a residual write."""
    served = FUSED_ROWS.served
    if served is None or out.shape[0] <= served:
        return
    tail = out[served:]
    tail.sub_((tail @ direction).unsqueeze(-1) * direction)


@mutating_op("fused_attention", ("output",))
def fused_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    output: torch.Tensor, served_layer: str, expert_layer: str) -> None:
    """vLLM's attention (KV-cache write, then attention) for the served rows through
    `served_layer` and for the expert's rows through `expert_layer`."""
    served = FUSED_ROWS.served
    if served is None or query.shape[0] <= served:
        _attend(query, key, value, output, served_layer)
        return
    _attend(query[:served], key[:served], value[:served], output[:served], served_layer)
    _attend(query[served:], key[served:], value[served:], output[served:], expert_layer)


def _attend(query, key, value, output, layer_name: str) -> None:
    from vllm.forward_context import get_forward_context
    from vllm.model_executor.layers.attention.attention import (
        unified_attention_with_output,
        unified_kv_cache_update,
    )

    layer = get_forward_context().no_compile_layers[layer_name]
    dependency = None
    if not layer.attn_backend.forward_includes_kv_cache_update:
        dependency = unified_kv_cache_update(key, value, layer_name)
    unified_attention_with_output(query, key, value, output, layer_name,
                                  kv_cache_dummy_dep=dependency)


def read_direction(folder: str | Path) -> torch.Tensor:
    """The refusal direction an `ablate` expert was made with, as a unit vector."""
    from safetensors.torch import load_file

    difference = load_file(str(Path(folder) / DIRECTION_FILE))[DIRECTION_KEY].float()
    return difference / difference.norm()


class SharedExpert(nn.Module):
    """What the expert owns: an attention layer per decoder layer (its KV cache), and its
    direction. No weights."""

    def __init__(self, attention: list[nn.Module], direction: torch.Tensor) -> None:
        super().__init__()
        self.attention = nn.ModuleList(attention)
        self.register_buffer("direction", direction, persistent=False)


def install_shared_expert(model: nn.Module, vllm_config, expert: str, prefix: str,
                          plan: Callable[[int], object | None]
                          ) -> tuple[SharedExpert, Callable]:
    """Fuse `expert`'s rows into `model`'s forward; returns the expert's own modules and
    the model's new `forward`, which appends the rows `plan(num_tokens)` names (its
    `ExpertPlan`, or None for every token) and returns `[served | expert]` hidden
    states side by side (zeros where the expert did not run)."""
    from vllm_safeinfer.engine.expert_rows import expert_inputs
    from vllm_safeinfer.engine.steering import decoder_layers

    device = next(model.parameters()).device
    direction = read_direction(expert).to(device=device, dtype=vllm_config.model_config.dtype)
    layers = decoder_layers(model)
    served_attention = [_attention_of(layer) for layer in layers]
    own = SharedExpert(
        [_own_attention(attn, vllm_config, f"{prefix}.model.layers.{i}.self_attn.attn", device)
         for i, attn in enumerate(served_attention)], direction)
    for served, mine in zip(served_attention, own.attention):
        served.forward = _fused_attention_forward(served, mine.layer_name)

    def ablate(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        expert_ablate_(out, direction)
        return out

    model.model.embed_tokens.register_forward_hook(ablate)
    for layer in layers:
        layer.self_attn.register_forward_hook(ablate)
        layer.mlp.register_forward_hook(ablate)
    _widen_compile_ranges(vllm_config)
    base_forward = model.forward

    def forward(input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        served = input_ids.shape[0]
        step = plan(served)
        tokens = None if step is None else step.tokens
        FUSED_ROWS.forwards += 1
        if tokens is not None and tokens.numel() == 0:
            FUSED_ROWS.forwards_without_expert += 1
            hidden = base_forward(input_ids, positions, intermediate_tensors, inputs_embeds,
                                  **kwargs)
            return torch.cat([hidden, torch.zeros_like(hidden)], dim=-1)
        if tokens is None:
            ids, where = torch.cat([input_ids, input_ids]), torch.cat([positions, positions])
        else:
            ids = torch.cat([input_ids, input_ids[tokens]])
            where = torch.cat([positions, positions[tokens]])
        FUSED_ROWS.expert_rows += ids.shape[0] - served
        FUSED_ROWS.served = served
        try:
            with expert_inputs(step) if step is not None else nullcontext():
                both = base_forward(ids, where, intermediate_tensors, None, **kwargs)
        finally:
            FUSED_ROWS.served = None
        hidden, ran = both[:served], both[served:]
        if tokens is None:
            return torch.cat([hidden, ran], dim=-1)
        expert_hidden = torch.zeros_like(hidden)
        expert_hidden[tokens] = ran
        return torch.cat([hidden, expert_hidden], dim=-1)

    return own, forward


def _attention_of(layer: nn.Module) -> nn.Module:
    attn = getattr(getattr(layer, "self_attn", None), "attn", None)
    if not _is_attention(attn):
        raise RuntimeError(f"SafeInfer: {type(layer).__name__} has no vLLM attention at "
                           "self_attn.attn for the weight-sharing expert")
    unsupported = [what for what, present in (
        ("a quantised query", attn.query_quant is not None),
        ("attention sinks", attn.has_sink),
        ("ALiBi", getattr(attn.impl, "alibi_slopes", None) is not None),
        ("a logits soft cap", getattr(attn.impl, "logits_soft_cap", None) not in (None, 0)),
        ("shared KV layers", attn.kv_sharing_target_layer_name is not None),
    ) if present]
    if unsupported:
        raise ValueError("SafeInfer expert_shares_weights does not run attention with "
                         + ", ".join(unsupported) + "; serve the materialised `ablate` "
                         "checkpoint as expert_model without sharing")
    return attn


def _own_attention(served: nn.Module, vllm_config, name: str, device) -> nn.Module:
    """An attention layer like `served`, registered as `name` (its own KV cache)."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.attention import Attention
    from vllm.utils.torch_utils import set_default_torch_dtype

    with set_current_vllm_config(vllm_config), set_default_torch_dtype(served.dtype):
        mine = Attention(served.num_heads, served.head_size, served.impl.scale,
                         num_kv_heads=served.num_kv_heads,
                         cache_config=vllm_config.cache_config,
                         quant_config=served.quant_config,
                         per_layer_sliding_window=served.sliding_window, prefix=name,
                         attn_type=served.attn_type, head_size_v=served.head_size_v)
    mine.to(device)
    _copy_scales(mine, served)
    return mine


def _fused_attention_forward(served: nn.Module, expert_layer: str) -> Callable:
    """`served.forward` (vLLM's `Attention.forward`, less what `_attention_of` refuses)
    through `fused_attention`."""

    def forward(query, key, value, output_shape=None, output_dtype=None):
        num_tokens = query.shape[0]
        if output_shape is None:
            output_shape = torch.Size((num_tokens, served.num_heads * served.head_size_v))
        output = torch.empty(output_shape, dtype=output_dtype or query.dtype,
                             device=query.device)
        width = output_shape[-1]
        fused_attention(query.view(-1, served.num_heads, served.head_size),
                        key.view(-1, served.num_kv_heads, served.head_size),
                        value.view(-1, served.num_kv_heads, served.head_size_v),
                        output.view(-1, served.num_heads, served.head_size_v),
                        served.layer_name, expert_layer)
        return output.view(-1, width)

    return forward


def forward_tokens(scheduler_config, shares_weights: bool) -> int:
    """The most tokens one forward of the served model holds: the step's token budget,
    twice it when the expert's rows ride along."""
    return scheduler_config.max_num_batched_tokens * (2 if shares_weights else 1)


def _widen_compile_ranges(vllm_config) -> None:
    """Compile for every token count a fused forward may hold."""
    compilation = vllm_config.compilation_config
    endpoints = compilation.compile_ranges_endpoints
    if endpoints:
        limit = vllm_config.scheduler_config.max_num_batched_tokens
        compilation.compile_ranges_endpoints = sorted(
            {e for e in endpoints if e != limit}
            | {forward_tokens(vllm_config.scheduler_config, shares_weights=True)})


def _is_attention(module: nn.Module | None) -> bool:
    """vLLM's attention layers: the modules that hold a KV cache."""
    return module is not None and hasattr(module, "kv_cache")


def _copy_scales(mine: nn.Module, served: nn.Module) -> None:
    """The served attention layer's KV-cache scales (they matter for a quantised KV
    cache)."""
    for name, buffer in mine.named_buffers(recurse=False):
        buffer.copy_(served.get_buffer(name))
    for name in _SCALE_ATTRIBUTES:
        if hasattr(served, name):
            setattr(mine, name, getattr(served, name))
