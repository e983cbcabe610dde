"""Context-adaptive SafeInfer inside vLLM's model: the harm probe's verdict per gated
request, taken on the device in the forward that holds the request's last prompt token.

A forward hook on the probe's decoder layer reads the residual stream there (vLLM's
layers return `(hidden, residual)`, whose sum is the stream) at each gated row's last
prompt token, scores it (`HarmProbe.scores`) and writes the row's verdict: flagged or let
through. The hook is registered before any steering hook, and the probe layer is at or
below every steered layer, so the verdict only reads unsteered states and is in place
before the steering add and the mixing of the same forward read it. Everything is fixed-
shape tensor code with no host read, so torch.compile and CUDA graphs keep it as is.
"""
from __future__ import annotations

import torch
from torch import nn

from vllm_safeinfer.common.probe import HarmProbe, linear_scores
from vllm_safeinfer.engine.batch_state import FLAGGED, LET_THROUGH, BatchState
from vllm_safeinfer.engine.steering import decoder_layers
from vllm_safeinfer.kernels.steer import token_rows


def probe_reference(
    stream: torch.Tensor,
    positions: torch.Tensor,
    query_start_loc: torch.Tensor,
    gated: torch.Tensor,
    prompt_len: torch.Tensor,
    direction: torch.Tensor,
    threshold: float,
    normalize: bool,
    verdict: torch.Tensor,
    score: torch.Tensor,
) -> None:
    """Write `verdict[row]` and `score[row]` for every gated row whose last prompt token is
    among the live tokens of `stream` ([T, H]); other rows keep theirs. `verdict` and
    `score` have one spare slot past the rows, which takes the undecided tokens' writes."""
    num_tokens = stream.shape[0]
    if num_tokens == 0 or query_start_loc.numel() < 2:
        return
    tokens, rows = token_rows(query_start_loc, num_tokens)
    decides = ((tokens < query_start_loc[-1]) & gated[rows]
               & (positions == prompt_len[rows] - 1))
    value = linear_scores(stream, direction, normalize)
    target = torch.where(decides, rows, verdict.numel() - 1)
    verdict.scatter_(0, target, torch.where(value > threshold, FLAGGED, LET_THROUGH)
                     .to(verdict.dtype))
    score.scatter_(0, target, value)


@torch.library.custom_op("safeinfer::probe_", mutates_args=("verdict", "score"))
def probe_(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    positions: torch.Tensor,
    query_start_loc: torch.Tensor,
    gated: torch.Tensor,
    prompt_len: torch.Tensor,
    direction: torch.Tensor,
    threshold: float,
    normalize: bool,
    verdict: torch.Tensor,
    score: torch.Tensor,
) -> None:
    """The probe as one opaque op (compiled graphs keep it as one call)."""
    if hidden.device.type == "cpu" and not bool(gated.any()):
        return  # on CPU the check is free and spares the [T, H] pass
    stream = hidden if residual is None else hidden.float() + residual.float()
    probe_reference(stream, positions, query_start_loc, gated, prompt_len, direction,
                    threshold, normalize, verdict, score)


@probe_.register_fake
def _probe_fake(hidden, residual, positions, query_start_loc, gated, prompt_len, direction,
                threshold, normalize, verdict, score) -> None:
    return None


class ProbeHook:
    """Forward hook of the probe's decoder layer."""

    def __init__(self, state: BatchState, probe: HarmProbe, threshold: float,
                 query_start_loc: torch.Tensor, device: torch.device) -> None:
        self.state = state
        self.direction = probe.direction.float().to(device)
        self.threshold = float(threshold)
        self.normalize = probe.normalize
        self.query_start_loc = query_start_loc

    def __call__(self, module: nn.Module, args: tuple, output):
        positions = args[0] if args else None
        if positions is None or positions.dim() != 1:
            raise RuntimeError("SafeInfer's harm probe needs 1-D token positions as the "
                               f"decoder layer's first argument ({type(module).__name__})")
        hidden, residual = (output[0], output[1]) if isinstance(output, tuple) else (output,
                                                                                   None)
        state = self.state
        probe_(hidden, residual, positions, self.query_start_loc, state.gated,
               state.prompt_len, self.direction, self.threshold, self.normalize,
               state.verdict, state.score)
        return output


def install_probe(model: nn.Module, state: BatchState, probe: HarmProbe, threshold: float,
                  query_start_loc: torch.Tensor) -> None:
    """Hook the probe on its layer; call before `install_steering` (hooks run in the
    order they were registered, and the probe must read the stream unsteered)."""
    layers = decoder_layers(model)
    device = state.verdict.device
    layers[probe.layer].register_forward_hook(
        ProbeHook(state, probe, threshold, query_start_loc, device))
