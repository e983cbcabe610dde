"""Which batch rows the unsafe expert runs on, step by step, and the attention metadata
that lets it run on those rows alone.

The expert's output only matters where it is mixed in, and its KV cache only where a
later step of a mixing request reads it. So each step it runs on the tokens of rows
whose mode mixes, except the decode tokens of gated (`auto`) rows the harm probe let
through; rows in `off` or `sa` never run it. Prefill tokens of a gated mixing row still
run it: the verdict comes at the last prompt token, and a flagged row needs the expert's
KV of its whole prompt. Prefix caching keeps this sound: mixing requests hash their
blocks apart from everyone else's, and gated ones from their last prompt token on
(`prefix_cache.py`), so no block whose expert KV was skipped is ever read by a request
that needs it.

The sub-batch's attention metadata is built the way vLLM slices micro-batches
(`ubatch_utils._make_metadata_with_slice`), by gathering rows instead of slicing a
range, with a metadata builder of the expert's own so no persistent buffer of the
served model's is touched. It is planned in Python on every eager forward; a forward
inside CUDA-graph capture, a dummy run, or a layout the gather does not handle (kernel
block tables, multi-group KV caches) runs the expert on every token, which is always
correct, only slower.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields

import numpy as np
import torch

from vllm_safeinfer.engine.batch_state import BatchState

# CommonAttentionMetadata fields the gather rebuilds; any other field set to a non-default
# value means a layout this module does not know, and the expert then runs on every row.
_GATHERED = frozenset({
    "query_start_loc", "query_start_loc_cpu", "seq_lens", "num_reqs", "num_actual_tokens",
    "max_query_len", "max_seq_len", "block_table_tensor", "slot_mapping", "causal",
    "positions", "is_prefilling", "seq_lens_cpu_upper_bound",
})


@dataclass(frozen=True)
class ExpertPlan:
    """One step's plan. `tokens` (device indices) are the tokens the expert runs on, None
    for all of them; `logit_rows` (host indices) the rows whose expert logits the mix
    may read; `metadata` and `slot_mapping` the expert layers' attention inputs for the
    sub-batch."""

    tokens: torch.Tensor | None
    logit_rows: torch.Tensor
    metadata: dict | None = None
    slot_mapping: dict | None = None


class ExpertRowPlanner:
    """Plans each forward's expert rows from the runner's step and the batch state."""

    def __init__(self, runner, state: BatchState, layer_names: list[str]) -> None:
        self.runner = runner
        self.state = state
        self.layer_names = layer_names
        self._group = None
        self._builder = None
        self._common = None  # the step's CommonAttentionMetadata, as the runner built it
        self._built = None  # the metadata the runner built from it for the expert's group
        self.rows_run = 0  # expert rows run in forwards with a plan (tests read them)
        self.rows_skipped = 0
        self.tokens_run = 0

    def _hook_group(self) -> bool:
        """Find the attention group of the expert's layers and record what the runner
        builds for it each step; False when the layout is not one this module handles."""
        if self._group is not None:
            return True
        groups = [g for gid_groups in getattr(self.runner, "attn_groups", ())
                  for g in gid_groups if self.layer_names[0] in g.layer_names]
        if len(groups) != 1 or len(self.runner.kv_cache_config.kv_cache_groups) != 1:
            return False
        group = groups[0]
        if group.kernel_block_size is not None or not set(self.layer_names) <= set(
                group.layer_names):
            return False
        original = group.build_metadata

        def build_metadata(common, ubatch_idx: int = 0, *args, **kwargs):
            built = original(common, ubatch_idx, *args, **kwargs)
            self._common, self._built = common, built
            return built

        group.build_metadata = build_metadata
        builder = group.get_metadata_builder(0)
        self._builder = type(builder)(builder.kv_cache_spec, self.layer_names,
                                      self.runner.vllm_config, self.runner.device)
        self._group = group
        return True

    def plan(self, num_tokens: int) -> ExpertPlan | None:
        """This forward's plan, or None: run the expert on every token, all logits."""
        from vllm.forward_context import get_forward_context, is_forward_context_available

        if not self._hook_group() or not is_forward_context_available():
            return None
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return None
        context = get_forward_context()
        metadata = context.attn_metadata
        common = self._common
        if (common is None or not isinstance(metadata, dict)
                or metadata.get(self.layer_names[0]) is not self._built
                or not _gatherable(common)):
            return None
        num_rows = common.num_reqs
        starts = common.query_start_loc_cpu[:num_rows + 1].numpy()
        if int(starts[-1]) > num_tokens:
            return None
        computed = torch.from_numpy(
            self.runner.input_batch.num_computed_tokens_cpu[:num_rows].copy())
        in_prefill = computed < self.state.prompt_len_host[:num_rows]
        run = self.state.expert_rows(num_rows, in_prefill).numpy()
        logit_rows = self.state.mixing_rows(num_rows).nonzero().flatten()
        lengths = np.diff(starts)
        self.rows_run += int(run.sum())
        self.tokens_run += int(lengths[run].sum())
        self.rows_skipped += int((~run & (lengths > 0)).sum())
        if run.all():
            return ExpertPlan(None, logit_rows)
        rows = np.flatnonzero(run)
        if rows.size == 0:
            return ExpertPlan(torch.empty(0, dtype=torch.long), logit_rows)
        tokens_host = np.concatenate([np.arange(starts[r], starts[r + 1]) for r in rows])
        device = common.query_start_loc.device
        tokens = torch.from_numpy(tokens_host).to(device, non_blocking=True)
        sub = _gather(common, rows, lengths[rows], tokens, device)
        built = self._builder.build(0, sub)
        slots = context.slot_mapping
        return ExpertPlan(
            tokens, logit_rows,
            metadata={name: built for name in self.layer_names},
            slot_mapping=({name: slots[name][tokens] for name in self.layer_names}
                          if isinstance(slots, dict) and self.layer_names[0] in slots
                          else None))


@contextmanager
def expert_inputs(plan: ExpertPlan) -> Iterator[None]:
    """Within the block, the expert's layers read `plan`'s metadata and slot mapping."""
    from vllm.forward_context import get_forward_context

    context = get_forward_context()
    saved = []
    for target, new in ((context.attn_metadata, plan.metadata),
                        (context.slot_mapping, plan.slot_mapping)):
        if new:
            saved.append((target, {k: target.get(k) for k in new}))
            target.update(new)
    try:
        yield
    finally:
        for target, old in saved:
            target.update(old)


def _gatherable(common) -> bool:
    for item in fields(common):
        if item.name in _GATHERED or item.name.startswith("_"):
            continue
        if getattr(common, item.name) is not None:
            return False
    return isinstance(common.causal, bool)


def _gather(common, rows: np.ndarray, lengths: np.ndarray, tokens: torch.Tensor, device):
    """`common` restricted to `rows` (ascending) and their `tokens`."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    starts_cpu = torch.zeros(rows.size + 1, dtype=common.query_start_loc_cpu.dtype)
    starts_cpu[1:] = torch.from_numpy(np.cumsum(lengths))
    index = torch.from_numpy(rows).to(device, non_blocking=True)
    upper = common.seq_lens_cpu_upper_bound
    upper = None if upper is None else upper[torch.from_numpy(rows)]
    return CommonAttentionMetadata(
        query_start_loc=starts_cpu.to(device, non_blocking=True),
        query_start_loc_cpu=starts_cpu,
        seq_lens=common.seq_lens[index],
        num_reqs=int(rows.size),
        num_actual_tokens=int(lengths.sum()),
        max_query_len=int(lengths.max()),
        max_seq_len=common.max_seq_len,
        block_table_tensor=common.block_table_tensor[index],
        slot_mapping=common.slot_mapping[tokens],
        causal=common.causal,
        positions=None if common.positions is None else common.positions[tokens],
        is_prefilling=(None if common.is_prefilling is None
                       else common.is_prefilling[torch.from_numpy(rows)]),
        seq_lens_cpu_upper_bound=upper,
    )
