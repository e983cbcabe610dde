"""Fitting and choosing a harm probe (`vllm_safeinfer.common.probe`): directions in one
or several decoder layers' residual stream, read at a position of the prompt, and a
threshold that flag harmful requests by meaning, not by style.

A difference of means between AdvBench's goals and everyday instructions at the last
templated token separates AdvBench's imperative phrasing from questions, not harm from
safety. So the probe is built on harmful prompts of several sources (AdvBench, HarmBench's
probe part, XSTest's unsafe calibration half) against safe ones of several (the
project's harmless instructions and hard benign prompts), every source weighing the
same, each prompt also dressed in HarmEval's styles and the project's jailbreak framings
(`dressed`), and candidates read the last prompt token, the content's last token or the
mean over the user's content. The direction is fitted on the data module's fit parts;
position, layers, method and threshold are chosen on its threshold parts (XSTest's safe
calibration half among them), which share no prompt or near twin with the fit parts.
"""
from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vllm_safeinfer.common.probe import LAST_PROMPT, POSITIONS, HarmProbe
from vllm_safeinfer.offline.probe.prompts import ProbePrompts, dressed, held_out_cut, refuse_twins
from vllm_safeinfer.offline.probe.states import probe_features, prompt_states
from vllm_safeinfer.offline.vector.heads import decoder_layers

TARGET_FPR = 0.02
HELD_OUT = 0.4  # of every style, to choose layer, method and threshold
MEAN_DIFFERENCE = "mean-difference"
LOGISTIC = "logistic"
METHODS = (MEAN_DIFFERENCE, LOGISTIC)
L2_PENALTIES = (1e-3, 1e-2, 1e-1, 1.0)


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
    """One probe the builder compares: where it reads (`position`), the layers it reads
    and how its direction is fitted (`l2`: the logistic fit's penalty)."""

    layers: tuple[int, ...]
    method: str
    normalize: bool
    l2: float | None = None
    position: str = LAST_PROMPT

    @property
    def family(self) -> str:
        return self.method + ("+normalized" if self.normalize else "")

    @property
    def name(self) -> str:
        return (f"{self.position}@{','.join(map(str, self.layers))}:{self.family}"
                + ("" if self.l2 is None else f":l2={self.l2:g}"))


def layer_sets(max_layer: int) -> list[tuple[int, ...]]:
    """Every layer 0..max_layer alone, and combined: the top three layers, and every
    third layer of the upper half (harm is spread over several layers' streams)."""
    single = [(layer,) for layer in range(max_layer + 1)]
    combined = {tuple(range(max(0, max_layer - 2), max_layer + 1)),
                tuple(range(max_layer, max_layer // 2 - 1, -3))[::-1]}
    return single + sorted(c for c in combined if len(c) > 1)


def candidates(max_layer: int, methods: Sequence[str] = METHODS,
               positions: Sequence[str] = POSITIONS) -> list[Candidate]:
    """Every position, layer set (`layer_sets`), raw and normalised scores, each logistic
    penalty."""
    unknown = set(methods) - set(METHODS)
    if unknown or not methods:
        raise ValueError(f"probe methods {sorted(unknown) or '(none)'}; known: "
                         f"{', '.join(METHODS)}")
    if not positions or set(positions) - set(POSITIONS):
        raise ValueError(f"probe positions {list(positions)}; known: {', '.join(POSITIONS)}")
    return [Candidate(layers, method, normalize, l2, position)
            for position in positions for layers in layer_sets(max_layer)
            for method in methods for normalize in (False, True)
            for l2 in ((None,) if method == MEAN_DIFFERENCE else L2_PENALTIES)]


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


def measure(direction: torch.Tensor, harmful: Mapping[str, torch.Tensor],
            safe: Mapping[str, torch.Tensor], target_fpr: float) -> dict:
    """A direction on held-out features ([n, D] per style, scored `x . w`): its threshold
    at `target_fpr` of every safe style, the flag rate of each style there, and each
    harmful style's AUC against the safe styles pooled."""
    score = {side: {style: x @ direction for style, x in styles.items()}
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


def _leave_one_out(candidate: Candidate, at, target_fpr: float) -> dict[str, dict]:
    """The chosen candidate refitted without each source's fit prompts in turn, its
    threshold chosen on the whole threshold part as before: how much of the left-out
    source's threshold part it flags (recall on a harmful source, false positives on a
    safe one) against the full fit's. A source the probe only catches because it was
    trained on its wording shows here."""
    parts = {side: (at(side, 0, candidate), at(side, 1, candidate))
             for side in ("harmful", "safe")}
    full = fit_direction(*(list(parts[side][0].values()) for side in ("harmful", "safe")),
                         method=candidate.method, l2=candidate.l2)
    found: dict[str, dict] = {}
    for side, (fit, _) in parts.items():
        if len(fit) < 2:
            continue
        for source in fit:
            kept = {s: {k: v for k, v in parts[s][0].items() if (s, k) != (side, source)}
                    for s in parts}
            direction = fit_direction(*(list(kept[s].values()) for s in ("harmful", "safe")),
                                      method=candidate.method, l2=candidate.l2)
            rates = [measure(d, parts["harmful"][1], parts["safe"][1], target_fpr)
                     for d in (direction, full)]
            key = "flag_rates" if side == "harmful" else "safe_flag_rates"
            if source in rates[0][key]:
                found[f"{side}:{source}"] = {"left_out": rates[0][key][source],
                                             "with_it": rates[1][key][source]}
    return found


@dataclass(frozen=True)
class ProbeBuild:
    """The chosen probe, and for comparison the best probe of every position and method
    family (raw or normalised difference of means or logistic regression) by the same
    rule, keyed `position:family`."""

    probe: HarmProbe
    families: Mapping[str, HarmProbe]


def build_probe(model: nn.Module, tokenizer, prompts: ProbePrompts, *, model_name: str,
                max_layer: int, threshold_prompts: ProbePrompts | None = None,
                target_fpr: float = TARGET_FPR, methods: Sequence[str] = METHODS,
                positions: Sequence[str] = POSITIONS, held_out: float = HELD_OUT,
                seed: int = 0, markers: tuple[Sequence[int], Sequence[int]] | None = None,
                dress: bool = False, model_fingerprint: str = "", batch_size: int = 16,
                progress: bool = False) -> ProbeBuild:
    """Fit every candidate (`candidates(max_layer, methods, positions)`) on `prompts` and
    keep the one `CHOICE_RULE` ranks first on `threshold_prompts` (by default a
    `held_out` share of every style of `prompts`, cut by twin groups within the style),
    with the threshold measured there.
    One forward pass per prompt: the states of layers 0..max_layer at every position are
    read once and kept in memory. `markers` (default: the tokenizer's chat template's)
    locate the user's content; `dress` fits and chooses on every prompt three ways
    (`dressed`), after the parts are checked for twins.

    A probe that flags none of the held-out harmful prompts would switch the defence off
    for every request: refused, as is an empty style, and a threshold part that shares a
    prompt (or a near twin) with the fit part."""
    from vllm_safeinfer.models import chat_markers

    if not 0 <= target_fpr < 1:
        raise ValueError(f"target false-positive rate must be in [0, 1), got {target_fpr}")
    if not 0 < held_out < 1:
        raise ValueError(f"held-out share must be in (0, 1), got {held_out}")
    grid = candidates(max_layer, methods, positions)
    if not prompts.harmful or not prompts.safe:
        raise ValueError("a probe needs harmful and safe prompts")
    rng = random.Random(seed)
    if threshold_prompts is None:
        cut = {side: {style: held_out_cut(texts, held_out, rng, f"{side} style {style!r}")
                      for style, texts in getattr(prompts, side).items()}
               for side in ("harmful", "safe")}
        prompts = ProbePrompts(*({style: tuple(fit) for style, (fit, _) in cut[side].items()}
                                 for side in ("harmful", "safe")))
        threshold_prompts = ProbePrompts(
            *({style: tuple(held) for style, (_, held) in cut[side].items()}
              for side in ("harmful", "safe")))
    else:
        refuse_twins(prompts, threshold_prompts)
    training_sha256 = prompts.sha256()
    if dress:
        prompts, threshold_prompts = dressed(prompts, seed), dressed(threshold_prompts,
                                                                      seed + 1)
    for part, where in ((prompts, "fit"), (threshold_prompts, "threshold")):
        empty = [f"{side} {style!r}" for side in ("harmful", "safe")
                 for style, texts in getattr(part, side).items() if not texts]
        if empty or not part.harmful or not part.safe:
            raise ValueError(f"the {where} part has no prompts for {empty or 'a side'}")
    markers = chat_markers(tokenizer) if markers is None else markers
    parts = {side: {style: (getattr(prompts, side).get(style, ()),
                            getattr(threshold_prompts, side).get(style, ()))
                    for style in {*getattr(prompts, side), *getattr(threshold_prompts, side)}}
             for side in ("harmful", "safe")}
    texts = [t for side in parts.values() for fit, held in side.values() for t in (*fit, *held)]
    states = prompt_states(model, tokenizer, texts, max_layer=max_layer, markers=markers,
                           batch_size=batch_size, progress=progress)
    rows = iter(range(len(texts)))
    index = {side: {style: tuple([next(rows) for _ in part] for part in cut)
                    for style, cut in styles.items()}
             for side, styles in parts.items()}

    def at(side: str, which: int, candidate: Candidate) -> dict[str, torch.Tensor]:
        """One side's fit (0) or threshold (1) features of `candidate`, by style."""
        x = probe_features(states, candidate.position, candidate.normalize)
        return {style: x[rows_][:, list(candidate.layers)].flatten(1)
                for style, cuts in index[side].items() if (rows_ := cuts[which])}

    from tqdm import tqdm

    measured: list[tuple[Candidate, torch.Tensor, dict]] = []
    for candidate in tqdm(grid, desc="candidates", disable=not progress):
        fit = [list(at(side, 0, candidate).values()) for side in ("harmful", "safe")]
        direction = fit_direction(*fit, method=candidate.method, l2=candidate.l2)
        measured.append((candidate, direction, measure(
            direction, at("harmful", 1, candidate), at("safe", 1, candidate), target_fpr)))
    ranked = sorted(measured, key=lambda item: _choice_key(item[2]), reverse=True)
    metrics = {
        "target_fpr": target_fpr, "max_layer": max_layer, "seed": seed, "dressed": dress,
        "choice_rule": CHOICE_RULE,
        "styles": {side: {style: {"fit": len(fit), "threshold": len(held)}
                          for style, (fit, held) in styles.items()}
                   for side, styles in parts.items()},
        "candidates": [{"candidate": c.name, **m} for c, _, m in measured],
    }
    num_layers = len(decoder_layers(model))

    def probe_of(candidate: Candidate, direction: torch.Tensor, chosen: dict) -> HarmProbe:
        return HarmProbe(
            directions=direction.reshape(len(candidate.layers), -1), layers=candidate.layers,
            threshold=chosen["threshold"], model=model_name,
            hidden_size=direction.numel() // len(candidate.layers), num_layers=num_layers,
            normalize=candidate.normalize, method=candidate.method,
            position=candidate.position, user_header=tuple(markers[0]),
            content_suffix=tuple(markers[1]), model_fingerprint=model_fingerprint,
            training_sha256=training_sha256,
            metrics={**metrics, "selection": {"candidate": candidate.name, **chosen}})

    best, direction, chosen = ranked[0]
    metrics["leave_one_out"] = _leave_one_out(best, at, target_fpr)
    if not any(chosen["flag_rates"].values()):
        raise ValueError(f"the best probe ({best.name}) flags none of the held-out harmful "
                         f"prompts at {target_fpr:.0%} of the safe ones: it would switch the "
                         "defence off for every request")
    families: dict[str, HarmProbe] = {}
    for candidate, fitted, result in ranked:
        key = f"{candidate.position}:{candidate.family}"
        if key not in families:
            families[key] = probe_of(candidate, fitted, result)
    return ProbeBuild(probe_of(best, direction, chosen), families)
