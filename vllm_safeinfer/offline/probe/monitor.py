"""The harm probe's answer monitor, chosen and measured offline: what a request let
through at its prompt writes is scored token by token, and a running mean over its
answer above the monitor's threshold flags it (`common/probe.py`, `engine/gating.py`).

A prompt can hide its harm (a framing the probe never saw, a request split over turns);
the answer cannot. The threshold is chosen on the model's own undefended answers to the
threshold part's safe prompts (at most `target_fpr` of each safe source's answers
flagged), never on the prompts the directions were fitted on, and the builder reports
which harmful prompts the prompt probe let through that the monitor then catches.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from torch import nn

from vllm_safeinfer.common.probe import HarmProbe
from vllm_safeinfer.offline.hf import left_pad, pad_id, positions
from vllm_safeinfer.offline.probe.fit import threshold_at

ANSWER_TOKENS = 32
MIN_TOKENS = 4


@torch.no_grad()
def answer_peaks(model: nn.Module, tokenizer, probe: HarmProbe, prompts: Sequence[str], *,
                 max_new_tokens: int = ANSWER_TOKENS, min_tokens: int = MIN_TOKENS,
                 batch_size: int = 16, progress: bool = False) -> torch.Tensor:
    """[prompts]: the highest running mean of `probe`'s token scores over each prompt's
    greedy, undefended answer, from its `min_tokens`-th token on (the monitor flags an
    answer iff this is above its threshold); -inf for an answer too short to be watched.
    The answer's last token is sampled, never run, as in the engine."""
    from tqdm import tqdm

    from vllm_safeinfer.models import chat_prompt_ids
    from vllm_safeinfer.offline.reference import RowSettings, SafeInferReference

    ids = chat_prompt_ids(tokenizer, list(prompts))
    reference = SafeInferReference(model, tokenizer)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    peaks = torch.full((len(ids),), float("-inf"))
    layers = list(probe.layers)
    for start in tqdm(range(0, len(order), batch_size), desc="answers", disable=not progress):
        rows = order[start:start + batch_size]
        answers = reference.generate([ids[i] for i in rows], RowSettings(), max_new_tokens)
        runs = [ids[i] + answer[:-1] for i, answer in zip(rows, answers)]
        input_ids, mask = left_pad(runs, pad_id(tokenizer), model.device)
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions(mask),
                    output_hidden_states=True, use_cache=False, logits_to_keep=1)
        states = torch.stack([out.hidden_states[layer + 1] for layer in layers], dim=2)
        scores = probe.token_scores(states)
        for j, (row, answer) in enumerate(zip(rows, answers)):
            fed = len(answer) - 1
            if fed < min_tokens:
                continue
            mine = scores[j, scores.shape[1] - fed:].double()
            running = mine.cumsum(0) / torch.arange(1, fed + 1, dtype=torch.float64)
            peaks[row] = float(running[min_tokens - 1:].max())
    return peaks


def choose_monitor(model: nn.Module, tokenizer, probe: HarmProbe,
                   safe: Mapping[str, Sequence[str]], harmful: Mapping[str, Sequence[str]],
                   prompt_scores: Mapping[str, torch.Tensor], *, target_fpr: float,
                   max_new_tokens: int = ANSWER_TOKENS, min_tokens: int = MIN_TOKENS,
                   batch_size: int = 16, progress: bool = False) -> tuple[HarmProbe, dict]:
    """`probe` with a monitor whose threshold flags at most `target_fpr` of every safe
    source's answers (the threshold part's prompts, by source), and what it measured:
    per source the share of answers flagged, and for harmful sources how many prompts
    the prompt probe let through (`prompt_scores` by source, in the order of `harmful`)
    and how many of those the monitor catches."""
    if not safe or any(not texts for texts in safe.values()):
        raise ValueError("the monitor's threshold needs safe prompts of every source")
    peaks = {name: answer_peaks(model, tokenizer, probe, texts, max_new_tokens=max_new_tokens,
                                min_tokens=min_tokens, batch_size=batch_size,
                                progress=progress)
             for name, texts in {**safe, **harmful}.items()}
    threshold = threshold_at([peaks[name][peaks[name] > float("-inf")] for name in safe],
                             target_fpr)
    report: dict[str, dict] = {}
    for name in (*safe, *harmful):
        flagged = peaks[name] > threshold
        row = {"answers": len(flagged), "flagged": round(float(flagged.double().mean()), 4)}
        if name in harmful:
            passed = prompt_scores[name] <= probe.threshold
            row.update(let_through=int(passed.sum()),
                       caught_after=int((passed & flagged).sum()))
        report[name] = row
    monitored = replace(probe, monitor_threshold=threshold, monitor_min_tokens=min_tokens)
    return monitored, {"threshold": threshold, "min_tokens": min_tokens,
                       "answer_tokens": max_new_tokens, "sources": report}


def evaluate_monitor(model: nn.Module, tokenizer, probe: HarmProbe, sets: Sequence[str],
                     styles: Sequence[str], *, limit: int, seed: int = 0,
                     batch_size: int = 16, progress: bool = False
                     ) -> dict[str, dict[str, dict]]:
    """Per evaluation set and style, on a seeded sample of `limit` prompts: the share the
    prompt probe flags, the share of those it lets through whose answers the monitor
    flags, and the share flagged either way (the gate's recall on a harmful set, its
    false positives on a safe one). Answers are generated only for the prompts let
    through. Reports only."""
    from vllm_safeinfer import data
    from vllm_safeinfer.offline.probe.report import styled
    from vllm_safeinfer.offline.probe.states import prompt_states, scores_of

    if probe.monitor_threshold is None:
        raise ValueError("the probe has no answer monitor to evaluate")
    report: dict[str, dict[str, dict]] = {}
    for name in sets:
        evaluated = data.evaluation_set(name)
        chosen = data.stratified_sample(evaluated.prompts, limit=limit, seed=seed)
        texts = [evaluated.prompts[i].text for i in chosen]
        report[name] = {}
        for style in styles:
            prompts = styled(texts, style, seed)
            states = prompt_states(model, tokenizer, prompts, max_layer=probe.layer,
                                   markers=(probe.user_header, probe.content_suffix),
                                   batch_size=batch_size)
            at_prompt = scores_of(probe, states) > probe.threshold
            passed = [p for p, flagged in zip(prompts, at_prompt.tolist()) if not flagged]
            caught = (answer_peaks(model, tokenizer, probe, passed,
                                   min_tokens=probe.monitor_min_tokens,
                                   batch_size=batch_size, progress=progress
                                   ) > probe.monitor_threshold
                      ) if passed else torch.zeros(0, dtype=torch.bool)
            n = len(prompts)
            report[name][style] = {
                "prompts": n, "prompt": round(float(at_prompt.double().mean()), 4),
                "let_through": len(passed),
                "monitor_of_let_through": round(float(caught.double().mean()), 4)
                if passed else 0.0,
                "either": round((int(at_prompt.sum()) + int(caught.sum())) / n, 4)}
    return report
