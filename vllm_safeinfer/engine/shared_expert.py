"""An `ablate` expert that shares the served model's weights (`expert_shares_weights`).

The `ablate` recipe's expert is the served model with its refusal direction projected out
of every residual write. Inside the worker it needs no weights of its own: its modules
are the served model's (every module that owns parameters is the served model's object,
so its packed CPU GEMM handles and quantised weights are shared too), its attention layers
are its own (their own paged KV cache, as for any expert), and three small wrappers
project the direction out of what the embedding, each attention block and each MLP write
into the residual stream. Its memory cost is its KV cache alone, and it computes what
the materialised checkpoint computes: `(I - uu^T) W x` either way.

At start-up the expert folder must be an `ablate` expert (`safeinfer expert build
--method ablate`) made from the served model's own weights: its recorded fingerprint of
the unablated model is compared with the served checkpoint's.
"""
from __future__ import annotations

import gc
import json
from pathlib import Path

import torch
from torch import nn

from vllm_safeinfer.common.expert_files import DIRECTION_FILE, DIRECTION_KEY, EXPERT_METADATA

ABLATE = "ablate"
_SCALE_ATTRIBUTES = ("_k_scale_float", "_v_scale_float", "_q_scale_float")


class Ablated(nn.Module):
    """`inner`'s output with the unit `direction` projected out."""

    def __init__(self, inner: nn.Module, direction: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("direction", direction, persistent=False)

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        return out - (out @ self.direction).unsqueeze(-1) * self.direction


def read_direction(folder: str | Path) -> torch.Tensor:
    """The refusal direction an `ablate` expert was made with, as a unit vector."""
    from safetensors.torch import load_file

    difference = load_file(str(Path(folder) / DIRECTION_FILE))[DIRECTION_KEY].float()
    return difference / difference.norm()


def check_shared_expert(expert: str, model_config) -> None:
    """Start-up check: `expert` is an `ablate` expert with its direction, made from the
    served checkpoint's weights (same fingerprint)."""
    from vllm_safeinfer.common.model_identity import checkpoint_fingerprint, local_checkpoint

    where = f"SafeInfer expert_model {expert!r} with expert_shares_weights"
    try:
        metadata = json.loads((Path(expert) / EXPERT_METADATA).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{where}: no readable {EXPERT_METADATA} ({exc}); only an expert "
                         "built by `safeinfer expert build --method ablate` can share the "
                         "served model's weights") from exc
    if metadata.get("method") != ABLATE:
        raise ValueError(f"{where}: it was built by the {metadata.get('method')!r} recipe; "
                         "only an `ablate` expert is the served model's own weights minus a "
                         "direction, so only it can share them")
    if not (Path(expert) / DIRECTION_FILE).is_file():
        raise ValueError(f"{where}: its direction file {DIRECTION_FILE} is missing")
    recorded = metadata.get("base_model_fingerprint")
    folder = local_checkpoint(model_config.model, getattr(model_config, "revision", None))
    served = None if folder is None else checkpoint_fingerprint(folder)
    if recorded is None or served is None:
        why = ("it records no fingerprint of its base: rebuild it" if recorded is None
               else "the served checkpoint has no local safetensors files")
        raise ValueError(f"{where}: cannot check that it was made from the served model "
                         f"({why})")
    if recorded != served:
        raise ValueError(f"{where}: it was made from other weights than the served model's "
                         f"({model_config.model}); sharing would serve another expert than "
                         "the one built")


def load_shared_expert(model: nn.Module, vllm_config, expert: str, prefix: str) -> nn.Module:
    """The expert as the served `model`'s modules minus the direction of `expert`'s
    folder, with attention layers of its own (registered under `prefix`, so vLLM gives
    them their own KV cache)."""
    from vllm.config.utils import replace
    from vllm.model_executor.model_loader import get_model

    from vllm_safeinfer.engine.steering import decoder_layers

    # The served model's architecture with random weights, to get attention layers of
    # the expert's own; every module that owns weights is then replaced by the served
    # model's, and the random copies are freed.
    dummy = replace(vllm_config.load_config, load_format="dummy")
    shell = get_model(vllm_config=vllm_config, load_config=dummy, prefix=prefix)
    # remove_duplicate=False: a tied output embedding is visited under both names.
    served = dict(model.named_modules(remove_duplicate=False))
    for name, module in list(shell.named_modules(remove_duplicate=False)):
        if not name:
            continue
        if name not in served:
            raise RuntimeError(f"SafeInfer: the served model has no module {name!r} for the "
                               "weight-sharing expert")
        if _is_attention(module):
            _copy_scales(module, served[name])
        elif next(module.parameters(recurse=False), None) is not None:
            _set_submodule(shell, name, served[name])
    # Free the random copies now: their packed CPU GEMM handles are released by
    # destructors that fail if the collector first runs them inside torch.compile's
    # tracing, which would leak them.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    device = next(model.parameters()).device
    dtype = vllm_config.model_config.dtype
    direction = read_direction(expert).to(device=device, dtype=dtype)
    shell.model.embed_tokens = Ablated(shell.model.embed_tokens, direction)
    for layer in decoder_layers(shell):
        layer.self_attn = Ablated(layer.self_attn, direction)
        layer.mlp = Ablated(layer.mlp, direction)
    return shell


def _is_attention(module: nn.Module) -> bool:
    """vLLM's attention layers: the modules that hold a KV cache."""
    return hasattr(module, "kv_cache")


def _copy_scales(mine: nn.Module, served: nn.Module) -> None:
    """The served attention layer's KV-cache scales (the dummy load randomised the
    expert's; they matter for a quantised KV cache)."""
    for name, buffer in mine.named_buffers(recurse=False):
        buffer.copy_(served.get_buffer(name))
    for name in _SCALE_ATTRIBUTES:
        if hasattr(served, name):
            setattr(mine, name, getattr(served, name))


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)
