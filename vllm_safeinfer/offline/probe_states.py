"""What a harm probe reads: the residual stream after each decoder layer at a
chat-formatted prompt's last token, exactly as HF's hidden states hold it, so that a
probe fitted on these states scores as the engine scores it at that token."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vllm_safeinfer.common.probe import HarmProbe
from vllm_safeinfer.models import chat_prompt_ids
from vllm_safeinfer.offline.heads import decoder_layers
from vllm_safeinfer.offline.hf import check_fp32, left_pad, model_device, pad_id, positions


class _Stop(Exception):
    """Raised after the last layer read: the rest of the forward pass is not needed."""


@torch.no_grad()
def last_token_states(model: nn.Module, tokenizer, prompts: Sequence[str], *,
                      max_layer: int, batch_size: int = 16, progress: bool = False
                      ) -> torch.Tensor:
    """[prompts, max_layer + 1, hidden] fp32 on the CPU: the residual stream after decoder
    layers 0..max_layer (HF's `hidden_states[layer + 1]`) at each chat-formatted prompt's
    last token. The forward stops after `max_layer`; prompts run in batches of similar
    length, left-padded with explicit positions, so each computes what it would alone."""
    from tqdm import tqdm

    check_fp32(model)
    layers = decoder_layers(model)
    if not 0 <= max_layer < len(layers):
        raise ValueError(f"layer {max_layer} outside the model's 0..{len(layers) - 1}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not prompts:
        raise ValueError("no prompts to read")
    ids = chat_prompt_ids(tokenizer, list(prompts))
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    device = model_device(model)
    captured: list[torch.Tensor] = []
    states: torch.Tensor | None = None

    def capture(layer: int):
        def hook(_module: nn.Module, _args: tuple, output) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            captured.append(hidden[:, -1, :].float().cpu())
            if layer == max_layer:
                raise _Stop

        return hook

    handles = [layers[i].register_forward_hook(capture(i)) for i in range(max_layer + 1)]
    try:
        with tqdm(total=len(ids), desc=f"layers 0-{max_layer}", disable=not progress) as bar:
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                input_ids, mask = left_pad([ids[i] for i in rows], pad_id(tokenizer), device)
                captured.clear()
                try:
                    model(input_ids=input_ids, attention_mask=mask,
                          position_ids=positions(mask), use_cache=False)
                except _Stop:
                    pass
                batch = torch.stack(captured, dim=1)
                if states is None:
                    states = torch.empty(len(ids), *batch.shape[1:])
                states[rows] = batch
                bar.update(len(rows))
    finally:
        for handle in handles:
            handle.remove()
    return states


def probe_scores(model: nn.Module, tokenizer, probe: HarmProbe, prompts: Sequence[str], *,
                 batch_size: int = 16, progress: bool = False) -> torch.Tensor:
    """[prompts] fp32: `probe`'s score of each prompt, as the engine computes it at the
    last prompt token (a score above `probe.threshold` flags the prompt)."""
    layers, hidden = len(decoder_layers(model)), model.get_input_embeddings().embedding_dim
    if (probe.num_layers, probe.hidden_size) != (layers, hidden):
        raise ValueError(f"{probe.source or 'harm probe'} reads {probe.num_layers} layers of "
                         f"width {probe.hidden_size}; the model has {layers} of width {hidden}")
    states = last_token_states(model, tokenizer, prompts, max_layer=probe.layer,
                               batch_size=batch_size, progress=progress)
    return probe.scores(states[:, probe.layer])
