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

The hooks are registered before any steering hook, and every probe layer is at or below
every steered layer, so they read unsteered states and the verdict is in place before the
steering add and the mixing of the same forward read it. Everything is fixed-shape
tensor code with no host read, so torch.compile and CUDA graphs keep it as is.
"""
from __future__ import annotations

import torch
from torch import nn

from vllm_safeinfer.common.probe import HarmProbe, linear_scores
from vllm_safeinfer.engine.batch_state import FLAGGED, LET_THROUGH, NEVER, BatchState
from vllm_safeinfer.engine.steering import decoder_layers
from vllm_safeinfer.kernels.ops import mutating_op
from vllm_safeinfer.kernels.steer import token_rows


def read_reference(stream: torch.Tensor, direction: torch.Tensor, normalize: bool,
                   first: bool, token_score: torch.Tensor) -> None:
    """`token_score[:T]` (+)= this layer's term `w . h` of each of `stream`'s [T, H]
    tokens; the first probe layer overwrites what the last forward left."""
    value = linear_scores(stream, direction, normalize)
    part = token_score[:stream.shape[0]]
    part.copy_(value if first else part + value)


def decide_reference(
    positions: torch.Tensor,
    query_start_loc: torch.Tensor,
    gated: torch.Tensor,
    read_start: torch.Tensor,
    read_end: torch.Tensor,
    prompt_len: torch.Tensor,
    threshold: float,
    monitor_threshold: float,
    monitor_min_tokens: int,
    token_score: torch.Tensor,
    window: torch.Tensor,
    answer: torch.Tensor,
    verdict: torch.Tensor,
    score: torch.Tensor,
    flag_position: torch.Tensor,
) -> None:
    """Per gated row among the live tokens: add its read window's scores to `window[:,
    row]` (sum, count); at its last prompt token write `verdict`, `score` (the window's
    mean) and, when flagged, `flag_position`; past its prompt, when let through and the
    monitor is on (`monitor_threshold` not NaN), add its generated tokens' scores to
    `answer[:, row]` and flag it at the first whose running mean (from
    `monitor_min_tokens` tokens on) is above `monitor_threshold`. Every per-row tensor
    has one spare slot past the rows, which takes the writes of tokens that decide
    nothing, so no shape depends on the data."""
    num_tokens = positions.shape[0]
    if num_tokens == 0 or query_start_loc.numel() < 2:
        return
    tokens, rows = token_rows(query_start_loc, num_tokens)
    spare = verdict.numel() - 1
    live = (tokens < query_start_loc[-1]) & gated[rows]
    s = token_score[:num_tokens]
    zero = torch.zeros_like(s)

    reads = live & (positions >= read_start[rows]) & (positions < read_end[rows])
    at = torch.where(reads, rows, spare)
    window[0].index_add_(0, at, torch.where(reads, s, zero))
    window[1].index_add_(0, at, reads.float())

    decides = live & (positions == prompt_len[rows] - 1)
    mean = window[0][rows] / window[1][rows].clamp_min(1.0)
    flagged = mean > threshold
    at = torch.where(decides, rows, spare)
    verdict.scatter_(0, at, torch.where(flagged, FLAGGED, LET_THROUGH).to(verdict.dtype))
    score.scatter_(0, at, mean)
    flag_position.scatter_(0, at, torch.where(flagged, positions, NEVER))

    if monitor_threshold != monitor_threshold:  # NaN: no monitor
        return
    watched = live & (positions >= prompt_len[rows]) & (verdict[rows] == LET_THROUGH)
    value = torch.where(watched, s, zero)
    # Running sums within this forward (a recomputed answer holds many tokens of a row,
    # contiguous), on top of what earlier forwards added.
    before = query_start_loc[rows]
    sums = torch.cat([zero[:1], value.cumsum(0)])
    counts = torch.cat([zero[:1], watched.float().cumsum(0)])
    running = answer[0][rows] + sums[tokens + 1] - sums[before]
    count = answer[1][rows] + counts[tokens + 1] - counts[before]
    crosses = (watched & (count >= monitor_min_tokens)
               & (running / count.clamp_min(1.0) > monitor_threshold))
    flag_position.scatter_reduce_(0, torch.where(crosses, rows, spare),
                                  torch.where(crosses, positions, NEVER), "amin")
    at = torch.where(watched, rows, spare)
    answer[0].index_add_(0, at, value)
    answer[1].index_add_(0, at, watched.float())


@mutating_op("probe_read_", ("token_score",))
def probe_read_(hidden: torch.Tensor, residual: torch.Tensor | None, gated: torch.Tensor,
                direction: torch.Tensor, normalize: bool, first: bool,
                token_score: torch.Tensor) -> None:
    """One probe layer's read as one opaque op (compiled graphs keep it as one call)."""
    if hidden.device.type == "cpu" and not bool(gated.any()):
        return  # on CPU the check is free and spares the [T, H] pass
    stream = hidden if residual is None else hidden.float() + residual.float()
    read_reference(stream, direction, normalize, first, token_score)


@mutating_op("probe_decide_", ("window", "answer", "verdict", "score", "flag_position"))
def probe_decide_(positions: torch.Tensor, query_start_loc: torch.Tensor,
                  gated: torch.Tensor, read_start: torch.Tensor, read_end: torch.Tensor,
                  prompt_len: torch.Tensor, threshold: float, monitor_threshold: float,
                  monitor_min_tokens: int, token_score: torch.Tensor, window: torch.Tensor,
                  answer: torch.Tensor, verdict: torch.Tensor, score: torch.Tensor,
                  flag_position: torch.Tensor) -> None:
    """The verdicts and the monitor as one opaque op."""
    if positions.device.type == "cpu" and not bool(gated.any()):
        return
    decide_reference(positions, query_start_loc, gated, read_start, read_end, prompt_len,
                     threshold, monitor_threshold, monitor_min_tokens, token_score, window,
                     answer, verdict, score, flag_position)


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
