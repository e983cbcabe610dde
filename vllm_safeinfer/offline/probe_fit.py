"""Fitting and choosing a harm probe (`vllm_safeinfer.common.probe`): a direction in one
decoder layer's residual stream and a threshold that flag harmful requests by meaning,
not by style.

A difference of means between AdvBench's goals and everyday instructions separates
AdvBench's imperative phrasing from questions, not harm from safety: XSTest's unsafe
questions, written like its safe ones, are barely flagged. So the probe is built on
harmful prompts of several styles (AdvBench, HarmBench's probe part, XSTest's unsafe
calibration half) against safe ones of several (the project's harmless instructions,
XSTest's safe calibration half), every style weighing the same. Part of every style is
held out (none of it is an evaluation prompt: the data module's split decides that) to
choose the layer, the method and the threshold among every candidate fitted on the
rest.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vllm_safeinfer.common.probe import HarmProbe, linear_scores
from vllm_safeinfer.offline.heads import decoder_layers
from vllm_safeinfer.offline.probe_states import last_token_states

TARGET_FPR = 0.02
HELD_OUT = 0.4  # of every style, to choose layer, method and threshold
MEAN_DIFFERENCE = "mean-difference"
LOGISTIC = "logistic"
METHODS = (MEAN_DIFFERENCE, LOGISTIC)
L2_PENALTIES = (1e-3, 1e-2, 1e-1, 1.0)


@dataclass(frozen=True)
class ProbePrompts:
    """What a probe is built on, by style: harmful prompts and safe ones."""

    harmful: Mapping[str, tuple[str, ...]]
    safe: Mapping[str, tuple[str, ...]]

    def sha256(self) -> str:
        """Identity of the prompts (the probe file's `training_sha256`)."""
        doc = {side: {style: list(texts) for style, texts in getattr(self, side).items()}
               for side in ("harmful", "safe")}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def default_probe_prompts(per_style: int | None = None, seed: int = 0) -> ProbePrompts:
    """The data module's probe parts: AdvBench's demonstrations and expert-training goals,
    HarmBench's probe part and XSTest's unsafe calibration half, against the harmless
    instructions and XSTest's safe calibration half. `per_style` caps each style at a
    seeded sample, stratified by category, for quick builds."""
    from vllm_safeinfer import data

    split = data.advbench_split()
    advbench = tuple(data.Prompt(row.goal, None)
                     for row in (*split.demonstrations, *split.expert_train))
    harmful = {"advbench": advbench, "harmbench": data.harmbench_split()[0],
               "xstest-unsafe": data.xstest_split(label="unsafe")[0]}
    safe = {"harmless": data.harmless_prompts(), "xstest": data.xstest_split()[0]}

    def sample(prompts: Sequence[data.Prompt]) -> tuple[str, ...]:
        return tuple(prompts[i].text
                     for i in data.stratified_sample(prompts, limit=per_style, seed=seed))

    return ProbePrompts({k: sample(v) for k, v in harmful.items()},
                        {k: sample(v) for k, v in safe.items()})


def auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(a positive scores above a negative), ties counting half (Mann-Whitney)."""
    diff = positive.double()[:, None] - negative.double()[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def threshold_at(safe_scores: Sequence[torch.Tensor], target_fpr: float,
                 harmful_scores: Sequence[torch.Tensor] = ()) -> float:
    """A threshold at which no safe style has more than `target_fpr` of its prompts
    scoring above it (a score above the threshold flags): the lowest such, moved halfway
    up to the lowest harmful score above it, which flags the same harmful prompts with a
    margin on the safe side."""
    def of_style(scores: torch.Tensor) -> float:
        allowed = math.floor(target_fpr * len(scores) + 1e-9)
        return float(scores.sort(descending=True).values[min(allowed, len(scores) - 1)])

    lowest = max(of_style(scores) for scores in safe_scores)
    above = [float(s[s > lowest].min()) for s in harmful_scores if bool((s > lowest).any())]
    return (lowest + min(above)) / 2 if above else lowest


@dataclass(frozen=True)
class Candidate:
    """One probe the builder compares: the layer it reads and how its direction is
    fitted (`l2`: the logistic fit's penalty)."""

    layer: int
    method: str
    normalize: bool
    l2: float | None = None

    @property
    def family(self) -> str:
        return self.method + ("+normalized" if self.normalize else "")

    @property
    def name(self) -> str:
        return f"{self.layer}:{self.family}" + ("" if self.l2 is None else f":l2={self.l2:g}")


def candidates(max_layer: int, methods: Sequence[str] = METHODS) -> list[Candidate]:
    """Every layer 0..max_layer, raw and normalised scores, each logistic penalty."""
    unknown = set(methods) - set(METHODS)
    if unknown or not methods:
        raise ValueError(f"probe methods {sorted(unknown) or '(none)'}; known: "
                         f"{', '.join(METHODS)}")
    return [Candidate(layer, method, normalize, l2)
            for layer in range(max_layer + 1) for method in methods
            for normalize in (False, True)
            for l2 in ((None,) if method == MEAN_DIFFERENCE else L2_PENALTIES)]


def _features(states: torch.Tensor, normalize: bool) -> torch.Tensor:
    """What a direction is fitted on: h, or h / |h| (`HarmProbe.normalize`)."""
    return states / states.norm(dim=-1, keepdim=True).clamp_min(1e-12) if normalize else states


def fit_direction(harmful: Sequence[torch.Tensor], safe: Sequence[torch.Tensor], *,
                  method: str, l2: float | None = None) -> torch.Tensor:
    """Unit direction along which the harmful styles' rows ([n, H] each) score above the
    safe ones', every style weighing the same: the difference of the styles' averaged
    means, or an L2-regularised logistic regression."""
    if method == MEAN_DIFFERENCE:
        direction = (torch.stack([x.double().mean(0) for x in harmful]).mean(0)
                     - torch.stack([x.double().mean(0) for x in safe]).mean(0))
    elif method == LOGISTIC:
        direction = _logistic(harmful, safe, 0.0 if l2 is None else l2)
    else:
        raise ValueError(f"unknown probe method {method!r}; known: {', '.join(METHODS)}")
    norm = direction.norm()
    if not torch.isfinite(direction).all() or norm == 0:
        raise ValueError("the harmful and safe prompts do not differ: no probe direction")
    return (direction / norm).float()


def _logistic(harmful: Sequence[torch.Tensor], safe: Sequence[torch.Tensor], l2: float,
              steps: int = 200) -> torch.Tensor:
    """Logistic regression on standardised features (each class weighing a half, each
    style an equal share of it; penalty `l2 * |w|^2`), its weights mapped back to the raw
    features (w / sigma): `w . h` orders prompts as the fitted model does."""
    groups = [(x, 1.0, len(harmful)) for x in harmful] + [(x, 0.0, len(safe)) for x in safe]
    x = torch.cat([g for g, _, _ in groups]).double()
    y = torch.cat([torch.full((len(g),), label, dtype=torch.float64) for g, label, _ in groups])
    weight = torch.cat([torch.full((len(g),), 0.5 / (styles * len(g)), dtype=torch.float64)
                        for g, _, styles in groups])
    mean = weight @ x
    std = (weight @ (x - mean).square()).sqrt().clamp_min(1e-8)
    z = (x - mean) / std
    with torch.enable_grad():
        w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                z @ w + b, y, weight=weight, reduction="sum") + l2 * w.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
    return w.detach() / std


def measure(direction: torch.Tensor, normalize: bool, harmful: Mapping[str, torch.Tensor],
            safe: Mapping[str, torch.Tensor], target_fpr: float) -> dict:
    """A direction on held-out states ([n, H] per style): its threshold at `target_fpr`
    of every safe style, the flag rate of each style there, and each harmful style's AUC
    against the safe styles pooled."""
    score = {side: {style: linear_scores(x, direction, normalize)
                    for style, x in styles.items()}
             for side, styles in (("harmful", harmful), ("safe", safe))}
    threshold = threshold_at(list(score["safe"].values()), target_fpr,
                             list(score["harmful"].values()))
    pooled = torch.cat(list(score["safe"].values()))
    flags = {style: float((s > threshold).double().mean()) for style, s in score["harmful"].items()}
    aucs = {style: auc(s, pooled) for style, s in score["harmful"].items()}
    return {"threshold": threshold, "flag_rates": _rounded(flags),
            "safe_flag_rates": _rounded({style: float((s > threshold).double().mean())
                                         for style, s in score["safe"].items()}),
            "auc": _rounded(aucs), "min_flag_rate": round(min(flags.values()), 4),
            "min_auc": round(min(aucs.values()), 4)}


def _rounded(values: Mapping[str, float]) -> dict[str, float]:
    return {key: round(value, 4) for key, value in values.items()}


CHOICE_RULE = ("at the threshold that flags at most target_fpr of every held-out safe style, "
               "the highest flag rate of the worst-flagged held-out harmful style; ties by "
               "the worst AUC, then the mean flag rate")


def _choice_key(measured: dict) -> tuple[float, float, float]:
    """`CHOICE_RULE` as a sort key (the greatest wins): the worst style's flag rate
    decides because the goal is a flag rate on every harmful set, not on average."""
    rates = measured["flag_rates"].values()
    return measured["min_flag_rate"], measured["min_auc"], sum(rates) / len(rates)


@dataclass(frozen=True)
class ProbeBuild:
    """The chosen probe, and for comparison the best probe of every method family (raw
    or normalised difference of means or logistic regression) by the same rule."""

    probe: HarmProbe
    families: Mapping[str, HarmProbe]


def _held_out_cut(texts: Sequence[str], held_out: float, rng: random.Random, where: str
                  ) -> tuple[list[str], list[str]]:
    from vllm_safeinfer.data.splits import grouped_cut

    fit, held = grouped_cut(texts, texts, (len(texts) - round(len(texts) * held_out),), rng)
    if not fit or not held:
        raise ValueError(f"{where}: {len(texts)} prompts cannot be cut into fit and held-out "
                         "parts; give each style at least 2 prompts that are not near twins")
    return fit, held


def build_probe(model: nn.Module, tokenizer, prompts: ProbePrompts, *, model_name: str,
                max_layer: int, target_fpr: float = TARGET_FPR,
                methods: Sequence[str] = METHODS, held_out: float = HELD_OUT, seed: int = 0,
                model_fingerprint: str = "", batch_size: int = 16, progress: bool = False
                ) -> ProbeBuild:
    """Fit every candidate (`candidates(max_layer, methods)`) on the fit part of every
    style and keep the one `CHOICE_RULE` ranks first on the held-out part, with the
    threshold measured there. One forward pass per prompt: the states of layers
    0..max_layer are read once and kept in memory.

    A probe that flags none of the held-out harmful prompts would switch the defence off
    for every request: refused, as is an empty style."""
    if not 0 <= target_fpr < 1:
        raise ValueError(f"target false-positive rate must be in [0, 1), got {target_fpr}")
    if not 0 < held_out < 1:
        raise ValueError(f"held-out share must be in (0, 1), got {held_out}")
    grid = candidates(max_layer, methods)
    if not prompts.harmful or not prompts.safe:
        raise ValueError("a probe needs harmful and safe prompts")
    rng = random.Random(seed)
    parts = {side: {style: _held_out_cut(texts, held_out, rng, f"{side} style {style!r}")
                    for style, texts in getattr(prompts, side).items()}
             for side in ("harmful", "safe")}
    texts = [t for side in parts.values() for fit, held in side.values() for t in (*fit, *held)]
    states = last_token_states(model, tokenizer, texts, max_layer=max_layer,
                               batch_size=batch_size, progress=progress)
    rows = iter(range(len(texts)))
    split_states = {side: {style: tuple(states[[next(rows) for _ in part]] for part in cut)
                           for style, cut in styles.items()}
                    for side, styles in parts.items()}

    def at(side: str, index: int, layer: int) -> dict[str, torch.Tensor]:
        """One side's fit (index 0) or held-out (1) states at `layer`, by style."""
        return {style: cut[index][:, layer] for style, cut in split_states[side].items()}

    measured: list[tuple[Candidate, torch.Tensor, dict]] = []
    for candidate in grid:
        fit = [[_features(x, candidate.normalize) for x in at(side, 0, candidate.layer).values()]
               for side in ("harmful", "safe")]
        direction = fit_direction(*fit, method=candidate.method, l2=candidate.l2)
        measured.append((candidate, direction, measure(
            direction, candidate.normalize, at("harmful", 1, candidate.layer),
            at("safe", 1, candidate.layer), target_fpr)))
    ranked = sorted(measured, key=lambda item: _choice_key(item[2]), reverse=True)
    metrics = {
        "target_fpr": target_fpr, "max_layer": max_layer, "held_out": held_out, "seed": seed,
        "choice_rule": CHOICE_RULE,
        "styles": {side: {style: {"fit": len(fit), "held_out": len(held)}
                          for style, (fit, held) in styles.items()}
                   for side, styles in parts.items()},
        "candidates": [{"candidate": c.name, **m} for c, _, m in measured],
    }
    num_layers = len(decoder_layers(model))

    def probe_of(candidate: Candidate, direction: torch.Tensor, chosen: dict) -> HarmProbe:
        return HarmProbe(
            direction=direction, layer=candidate.layer, threshold=chosen["threshold"],
            model=model_name, hidden_size=direction.numel(), num_layers=num_layers,
            normalize=candidate.normalize, method=candidate.method,
            model_fingerprint=model_fingerprint, training_sha256=prompts.sha256(),
            metrics={**metrics, "selection": {"candidate": candidate.name, **chosen}})

    best, direction, chosen = ranked[0]
    if not any(chosen["flag_rates"].values()):
        raise ValueError(f"the best probe ({best.name}) flags none of the held-out harmful "
                         f"prompts at {target_fpr:.0%} of the safe ones: it would switch the "
                         "defence off for every request")
    families: dict[str, HarmProbe] = {}
    for candidate, fitted, result in ranked:
        if candidate.family not in families:
            families[candidate.family] = probe_of(candidate, fitted, result)
    return ProbeBuild(probe_of(best, direction, chosen), families)
