"""The harm probe's two custom ops, each beside its torch reference: a layer's read of
every token's score and the deepest layer's decision (the verdicts and the answer monitor).

They sit here, not with the hooks that call them (`engine/gating.py`), for the same reason
as the steering ops: an op and the reference it is checked against belong together, and
the kernels import nothing of the engine, so the verdict values the decision writes are
defined here and the engine's batch state imports them.

`probe_read_` adds one probe layer's term `w . h` (`common.probe.linear_scores`) of every
token's score into `token_score`. `probe_decide_` then sums, per gated row, the scores of
its read window (the prompt positions `[read_start, read_end)`, which may span several
chunks of a chunked prefill); in the forward that holds its last prompt token it flags the
row or lets it through, and a row let through is watched on its generated tokens and
flagged at the first whose running mean crosses the monitor's threshold. `flag_position`
records where. Fixed-shape tensor code with no host read, so torch.compile and CUDA graphs
keep both as they are; on CPU an op with no gated row skips its pass.
"""
import torch

from vllm_safeinfer.common.probe import linear_scores
from vllm_safeinfer.kernels.ops import mutating_op
from vllm_safeinfer.kernels.steer import token_rows

# A gated row's harm-probe verdict at its prompt, written on the device by the probe; a
# row let through may still be flagged later by the answer monitor.
PENDING, LET_THROUGH, FLAGGED = 0, 1, 2
# `flag_position` of a row not flagged: past any position, so nothing is steered.
NEVER = 2**40


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
