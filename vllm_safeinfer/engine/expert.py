"""The unsafe expert of safety-guided decoding, inside the served model's worker.

It is loaded the way vLLM's draft-model speculative decoding loads a draft: its attention
layers register in the shared forward context, so vLLM gives them paged KV cache in the
same block table as the served model (no scheduler change; their KV comes out of the same
block budget). The served model's `forward` then also runs the expert on the same tokens
and positions, never steered, and returns both hidden states side by side;
`compute_logits` splits them, returns the served model's logits and keeps the expert's
for the logits processor. It runs only on the rows that need it (`expert_rows.py`):
mixing rows, less the decode tokens of gated rows the harm probe let through.

An `ablate` expert can instead share the served model's weights
(`expert_shares_weights`, `shared_expert.py`): then it has no forward of its own (its
rows ride in the served model's) and only its KV cache costs memory.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from vllm_safeinfer.common.config import SafeInferConfig
from vllm_safeinfer.common.expert_files import expert_model_config
from vllm_safeinfer.engine.expert_rows import ExpertPlan, ExpertRowPlanner, expert_inputs

MODEL_TAG = "safeinfer_expert"


class ExpertLogits:
    """The expert's logits of the current step, handed from `compute_logits` to the
    logits processor, and the expert module that made them. `rows` (host indices into
    the batch) says which rows the logits are of; None means all, in order."""

    def __init__(self, dtype: torch.dtype, model: nn.Module) -> None:
        self.dtype = dtype  # what the expert's weights are in
        self.model = model
        self.planner: ExpertRowPlanner | None = None
        self.planned_rows: torch.Tensor | None = None  # the last forward's plan
        self._batch: tuple[int, torch.Tensor | None, torch.Tensor] | None = None

    def plan(self, num_tokens: int) -> ExpertPlan | None:
        """This forward's plan (`ExpertRowPlanner.plan`), its logit rows kept for
        `compute_logits`."""
        step = self.planner.plan(num_tokens)
        self.planned_rows = None if step is None else step.logit_rows
        return step

    def put(self, num_rows: int, rows: torch.Tensor | None, logits: torch.Tensor) -> None:
        self._batch = (num_rows, rows, logits)

    def take(self, num_rows: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        batch, self._batch = self._batch, None
        if batch is None or batch[0] != num_rows:
            raise RuntimeError(
                "SafeInfer: the expert's logits are missing or misaligned with the batch "
                f"({None if batch is None else batch[0]} rows for {num_rows})"
            )
        return batch[1], batch[2]


def install_expert(model: nn.Module, vllm_config, config: SafeInferConfig,
                   planner_of: Callable[[list[str]], ExpertRowPlanner]) -> ExpertLogits:
    """Load the expert next to `model` and route its logits to the returned holder;
    `planner_of(expert attention layer names)` plans which rows it runs on. An expert
    sharing the served weights runs inside the served model's forward
    (`shared_expert.py`), any other as a model of its own after it."""
    from vllm.compilation.backends import set_model_tag
    from vllm.config import set_current_vllm_config
    from vllm.config.utils import replace
    from vllm.model_executor.model_loader import get_model

    from vllm_safeinfer.engine.shared_expert import install_shared_expert

    base_forward = model.forward
    base_compute_logits = model.compute_logits
    holder: ExpertLogits
    if config.expert_shares_weights:
        own, forward = install_shared_expert(model, vllm_config, config.expert_model,
                                             MODEL_TAG, lambda tokens: holder.plan(tokens))
        holder = ExpertLogits(vllm_config.model_config.dtype, own)
        holder.planner = planner_of(attention_layer_names(own))
        expert_logits, shares_head = base_compute_logits, True
    else:
        with set_current_vllm_config(vllm_config), set_model_tag(MODEL_TAG):
            expert_config = replace(
                vllm_config, quant_config=None,
                model_config=expert_model_config(config, vllm_config.model_config))
            expert = get_model(vllm_config=expert_config, prefix=MODEL_TAG)
        holder = ExpertLogits(next(expert.parameters()).dtype, expert)
        holder.planner = planner_of(attention_layer_names(expert))
        expert_hidden_size = expert.config.get_text_config().hidden_size
        forward = _separate_forward(base_forward, expert, holder, expert_hidden_size)
        expert_logits, shares_head = expert.compute_logits, False
    base_hidden = vllm_config.model_config.get_hidden_size()
    expert_dtype = holder.dtype

    def compute_logits(hidden_states: torch.Tensor):
        num_rows = hidden_states.shape[0]
        rows = holder.planned_rows
        if rows is not None and (rows.numel() and int(rows.max()) >= num_rows):
            rows = None  # not the planned step's rows (a dummy sampler run)
        served_states = hidden_states[..., :base_hidden]
        expert_states = hidden_states[..., base_hidden:].to(expert_dtype)
        if rows is not None:
            expert_states = expert_states[rows.to(expert_states.device)]
        if not expert_states.shape[0]:
            holder.put(num_rows, rows, expert_states.new_empty(0, 0))
            return base_compute_logits(served_states)
        if shares_head:  # one read of the LM head for both models' rows
            both = base_compute_logits(torch.cat([served_states, expert_states]))
            holder.put(num_rows, rows, both[num_rows:])
            return both[:num_rows]
        holder.put(num_rows, rows, expert_logits(expert_states))
        return base_compute_logits(served_states)

    # Instance attributes: nn.Module.__call__ picks them up, the class stays untouched.
    model.forward = forward
    model.compute_logits = compute_logits
    return holder


def _separate_forward(base_forward: Callable, expert: nn.Module, holder: ExpertLogits,
                      expert_hidden_size: int) -> Callable:
    """The served model's forward followed by the expert's own, on the planned rows.

    The pair travels in the served model's dtype (vLLM sizes its buffers by it); each
    half goes back to its own model's dtype for its lm_head. An expert in a lower
    precision (a bf16 expert beside an fp32 model) round-trips exactly. Tokens the
    expert skips get zeros: no mix reads them."""

    def forward(input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        hidden = base_forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        plan = holder.plan(input_ids.shape[0])
        if plan is None or plan.tokens is None:
            expert_hidden = expert(input_ids, positions, None, None).to(hidden.dtype)
        else:
            expert_hidden = hidden.new_zeros(hidden.shape[0], expert_hidden_size)
            if plan.tokens.numel():
                with expert_inputs(plan):
                    ran = expert(input_ids[plan.tokens], positions[plan.tokens], None, None)
                expert_hidden[plan.tokens] = ran.to(hidden.dtype)
        return torch.cat([hidden, expert_hidden], dim=-1)

    return forward


def attention_layer_names(expert: nn.Module) -> list[str]:
    """The forward-context names of the expert's attention layers."""
    from vllm.model_executor.layers.attention import Attention

    names = [m.layer_name for m in expert.modules() if isinstance(m, Attention)]
    if not names:
        raise RuntimeError("SafeInfer: the expert model has no attention layers vLLM knows")
    return names
