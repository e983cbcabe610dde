"""Safety amplification inside vLLM's model, per request, on the output hidden state of
each layer the request's vector steers: `h += gamma * vector` (an adding vector) or
`h += (gamma * |vector| - h.u) u` (a projecting one, `u` its direction), at SafeInfer's
positions (the last prompt token and every generated token, or only the vector's first
`answer_tokens` of them); a gated request (mode `auto`) only from the position where the
harm probe flagged it (its last prompt token,
or a generated token the answer monitor flagged: `gating.py`).

vLLM decoder layers return `(hidden, residual)` and the next layer adds them, so adding
to `hidden` after layer k is adding to the residual stream after layer k. A projection
must see the whole residual stream: its op reads `hidden + residual` for the component
and writes the change into `hidden` alone. Each kind is one in-place custom op (the
fused Triton kernel on GPU) that reads only persistent tensors, so it is captured
correctly by torch.compile and CUDA graphs: it is installed before either runs (from
`Worker.load_model`).
"""
from __future__ import annotations

import torch
from torch import nn

from vllm_safeinfer.engine.batch_state import BatchState
from vllm_safeinfer.kernels.project import project_
from vllm_safeinfer.kernels.steer import steer_


class SteeringHook:
    """Forward hook of one steered decoder layer."""

    def __init__(self, state: BatchState, layer: int, query_start_loc: torch.Tensor) -> None:
        self.state = state
        self.slot = state.layer_slot[layer]
        self.query_start_loc = query_start_loc

    def __call__(self, module: nn.Module, args: tuple, output):
        positions = args[0] if args else None
        hidden = output[0] if isinstance(output, tuple) else output
        residual = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if positions is None or positions.dim() != 1:
            raise RuntimeError(
                "SafeInfer steering needs 1-D token positions as the decoder layer's first "
                f"argument; {type(module).__name__} got {None if positions is None else tuple(positions.shape)}"
            )
        state = self.state
        steered_from = state.steered_from()
        steer_(hidden, positions, self.query_start_loc, state.scale[self.slot],
               state.vector_id, steered_from, state.steer_tokens, state.vector_table)
        project_(hidden, residual, positions, self.query_start_loc, state.target[self.slot],
                 state.vector_id, steered_from, state.steer_tokens, state.unit_table)
        return output


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers (`model.model.layers` in vLLM's decoder models)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise RuntimeError(
            f"SafeInfer steering cannot find the decoder layers of {type(model).__name__} "
            "(expected model.model.layers)"
        )
    return layers


def install_steering(model: nn.Module, state: BatchState, query_start_loc: torch.Tensor) -> None:
    layers = decoder_layers(model)
    # Layers were checked against the model's depth when the vectors were loaded.
    for layer in state.vectors.layers:
        layers[layer].register_forward_hook(SteeringHook(state, layer, query_start_loc))
