"""What a harm probe reads: the residual stream after each decoder layer of a
chat-formatted prompt, at its last token, at its content's last token or averaged over
its content, exactly as HF's hidden states hold it, so that a probe fitted on these
states scores as the engine scores it."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vllm_safeinfer.common.probe import (
    CONTENT_MEAN,
    LAST_CONTENT,
    LAST_PROMPT,
    HarmProbe,
    content_window,
)
from vllm_safeinfer.models import chat_prompt_ids
from vllm_safeinfer.offline.hf import check_fp32, left_pad, model_device, pad_id, positions
from vllm_safeinfer.offline.vector.heads import decoder_layers


class _Stop(Exception):
    """Raised after the last layer read: the rest of the forward pass is not needed."""


# The features a probe can be fitted on: the residual stream at a position, or averaged
# over the user's content (raw, or each token normalised first: the engine's `normalize`
# divides each token's score by its own norm).
FEATURES = (LAST_PROMPT, LAST_CONTENT, CONTENT_MEAN, CONTENT_MEAN + "+normalized")


@torch.no_grad()
def prompt_states(model: nn.Module, tokenizer, prompts: Sequence[str], *, max_layer: int,
                  markers: tuple[Sequence[int], Sequence[int]] = ((), ()),
                  batch_size: int = 16, progress: bool = False) -> dict[str, torch.Tensor]:
    """Per `FEATURES` name, [prompts, max_layer + 1, hidden] fp32 on the CPU: the residual
    stream after decoder layers 0..max_layer (HF's `hidden_states[layer + 1]`) of each
    chat-formatted prompt, at its last token, at its content's last token, and averaged
    over its content (`markers`: the template's user header and content suffix, as
    `common.probe.content_window` finds them). The forward stops after `max_layer`;
    prompts run in batches of similar length, left-padded with explicit positions, so
    each computes what it would alone."""
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
    windows = [content_window(row, *markers) for row in ids]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    device = model_device(model)
    captured: list[torch.Tensor] = []
    shape = (len(ids), max_layer + 1, model.get_input_embeddings().embedding_dim)
    states = {name: torch.empty(shape) for name in FEATURES}

    def capture(layer: int):
        def hook(_module: nn.Module, _args: tuple, output) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            captured.append(hidden.float())
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
                batch = torch.stack(captured, dim=1)  # [rows, layers, T, H]
                width = batch.shape[2]
                for j, row in enumerate(rows):
                    first, end = windows[row]
                    offset = width - len(ids[row])  # left padding
                    content = batch[j, :, offset + first:offset + end]
                    states[LAST_PROMPT][row] = batch[j, :, -1].cpu()
                    states[LAST_CONTENT][row] = content[:, -1].cpu()
                    states[CONTENT_MEAN][row] = content.mean(1).cpu()
                    states[FEATURES[3]][row] = (content / content.norm(dim=-1, keepdim=True)
                                                .clamp_min(1e-12)).mean(1).cpu()
                bar.update(len(rows))
    finally:
        for handle in handles:
            handle.remove()
    return states


def probe_features(states: dict[str, torch.Tensor], position: str,
                   normalize: bool) -> torch.Tensor:
    """What a probe reading at `position` scores, [prompts, layers, hidden]: a plain
    `w . x` of these is its score."""
    if position == CONTENT_MEAN:
        return states[FEATURES[3] if normalize else CONTENT_MEAN]
    x = states[position]
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12) if normalize else x


def last_token_states(model: nn.Module, tokenizer, prompts: Sequence[str], *,
                      max_layer: int, batch_size: int = 16, progress: bool = False
                      ) -> torch.Tensor:
    """[prompts, max_layer + 1, hidden]: `prompt_states` at each prompt's last token."""
    return prompt_states(model, tokenizer, prompts, max_layer=max_layer,
                         batch_size=batch_size, progress=progress)[LAST_PROMPT]


def probe_scores(model: nn.Module, tokenizer, probe: HarmProbe, prompts: Sequence[str], *,
                 batch_size: int = 16, progress: bool = False) -> torch.Tensor:
    """[prompts] fp32: `probe`'s score of each prompt, as the engine computes it (a score
    above `probe.threshold` flags the prompt)."""
    layers, hidden = len(decoder_layers(model)), model.get_input_embeddings().embedding_dim
    if (probe.num_layers, probe.hidden_size) != (layers, hidden):
        raise ValueError(f"{probe.source or 'harm probe'} reads {probe.num_layers} layers of "
                         f"width {probe.hidden_size}; the model has {layers} of width {hidden}")
    states = prompt_states(model, tokenizer, prompts, max_layer=probe.layer,
                           markers=(probe.user_header, probe.content_suffix),
                           batch_size=batch_size, progress=progress)
    return scores_of(probe, states)


def scores_of(probe: HarmProbe, states: dict[str, torch.Tensor]) -> torch.Tensor:
    """[prompts]: `probe`'s scores from `prompt_states` read at least to its layer."""
    x = probe_features(states, probe.position, probe.normalize)[:, list(probe.layers)]
    return (x * probe.directions[None]).sum(dim=(1, 2))
