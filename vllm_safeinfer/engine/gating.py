"""Context-adaptive SafeInfer inside vLLM's model: the harm probe's verdict per gated
request, taken on the device inside the forward, and the answer monitor.

A forward hook on each of the probe's decoder layers reads the residual stream there
(vLLM's layers return `(hidden, residual)`, whose sum is the stream) and adds its layer's
term of every token's score into `token_score` (`probe_read_`). The deepest layer's hook
then decides (`probe_decide_`): each gated row sums the scores of its read window (the
prompt positions `[read_start, read_end)`, which may span several chunks of a chunked
prefill), and in the forward that holds its last prompt token flags it or lets it
through; a row let through is then watched on its generated tokens, and flagged at the
first whose running mean crosses the monitor's threshold. `flag_position` records where
(the last prompt token, or that generated token): steering defends a row from there on.
Both ops live beside their torch references in `kernels/probe.py`.

The hooks are registered before any steering hook, and every probe layer is at or below
every steered layer, so they read unsteered states and the verdict is in place before the
steering add and the mixing of the same forward read it. Everything is fixed-shape
tensor code with no host read, so torch.compile and CUDA graphs keep it as is.
"""
from __future__ import annotations

import torch
from torch import nn

from vllm_safeinfer.common.probe import HarmProbe
from vllm_safeinfer.engine.batch_state import BatchState
from vllm_safeinfer.engine.steering import decoder_layers
from vllm_safeinfer.kernels.probe import probe_decide_, probe_read_


class ProbeHook:
    """Forward hook of one probe layer (`index` into the probe's layers); the deepest
    one also decides."""

    def __init__(self, state: BatchState, probe: HarmProbe, index: int, threshold: float,
                 query_start_loc: torch.Tensor, token_score: torch.Tensor) -> None:
        self.state = state
        self.direction = probe.directions[index].float().to(token_score.device)
        self.normalize = probe.normalize
        self.first = index == 0
        self.decides = index == len(probe.layers) - 1
        self.threshold = float(threshold)
        self.monitor_threshold = (float("nan") if probe.monitor_threshold is None
                                  else float(probe.monitor_threshold))
        self.monitor_min_tokens = probe.monitor_min_tokens
        self.query_start_loc = query_start_loc
        self.token_score = token_score

    def __call__(self, module: nn.Module, args: tuple, output):
        positions = args[0] if args else None
        if positions is None or positions.dim() != 1:
            raise RuntimeError("SafeInfer's harm probe needs 1-D token positions as the "
                               f"decoder layer's first argument ({type(module).__name__})")
        hidden, residual = (output[0], output[1]) if isinstance(output, tuple) else (output,
                                                                                   None)
        state = self.state
        probe_read_(hidden, residual, state.gated, self.direction, self.normalize,
                    self.first, self.token_score)
        if self.decides:
            probe_decide_(positions, self.query_start_loc, state.gated, state.read_start,
                          state.read_end, state.prompt_len, self.threshold,
                          self.monitor_threshold, self.monitor_min_tokens, self.token_score,
                          state.window, state.answer, state.verdict, state.score,
                          state.flag_position)
        return output


def install_probe(model: nn.Module, state: BatchState, probe: HarmProbe, threshold: float,
                  query_start_loc: torch.Tensor, max_tokens: int) -> None:
    """Hook the probe on its layers; call before `install_steering` (hooks run in the
    order they were registered, and the probe must read the stream unsteered).
    `max_tokens` bounds the tokens of one forward (`shared_expert.forward_tokens`)."""
    layers = decoder_layers(model)
    token_score = torch.zeros(max_tokens, dtype=torch.float32, device=state.verdict.device)
    for index, layer in enumerate(probe.layers):
        layers[layer].register_forward_hook(
            ProbeHook(state, probe, index, threshold, query_start_loc, token_score))
    state.gating = True
    state.monitoring = probe.monitors
