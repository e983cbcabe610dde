"""What a harm probe is built on: prompts by side and source (`ProbePrompts`), the data
module's fit and threshold parts (`default_probe_prompts`), every prompt dressed in
HarmEval's styles and the project's jailbreak framings (`dressed`), and the checks that
keep a threshold off the prompts a direction was fitted on."""
from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


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


def default_probe_prompts(per_style: int | None = None, seed: int = 0
                          ) -> tuple[ProbePrompts, ProbePrompts]:
    """(fit, threshold): the data module's probe parts (`data.probe_parts`), by source.
    Harmful: AdvBench's demonstrations and expert-training goals, HarmBench's probe part,
    XSTest's unsafe calibration half; safe: the harmless instructions, the project's hard
    benign prompts and (threshold only) XSTest's safe calibration half. `per_style` caps
    each source's part at a seeded sample, stratified by category, for quick builds."""
    from vllm_safeinfer import data

    parts = data.probe_parts()

    def sample(prompts: Sequence[data.Prompt]) -> tuple[str, ...]:
        return tuple(prompts[i].text
                     for i in data.stratified_sample(prompts, limit=per_style, seed=seed))

    def part(which: str) -> ProbePrompts:
        return ProbePrompts(*({name: sample(getattr(source, which))
                               for name, source in getattr(parts, side).items()
                               if getattr(source, which)}
                              for side in ("harmful", "safe")))

    return part("fit"), part("threshold")


def dressed(prompts: ProbePrompts, seed: int = 0) -> ProbePrompts:
    """Every prompt three ways, harmful and safe alike: bare, in one of HarmEval's prompt
    styles and in one of the training jailbreak framings (seeded), so the probe learns
    harm, not a wrapper's words."""
    from vllm_safeinfer.data.framings import TRAINING_FRAMINGS
    from vllm_safeinfer.harmeval.prompts import STYLES, style_prompt

    rng = random.Random(seed)

    def three(texts: Sequence[str]) -> tuple[str, ...]:
        return tuple(t for text in texts for t in (
            text, style_prompt(text, rng.choice(STYLES)), rng.choice(TRAINING_FRAMINGS)
            .apply(text)))

    return ProbePrompts(*({style: three(texts) for style, texts in getattr(prompts, side)
                           .items()} for side in ("harmful", "safe")))


def held_out_cut(texts: Sequence[str], held_out: float, rng: random.Random, where: str
                  ) -> tuple[list[str], list[str]]:
    from vllm_safeinfer.data.splits import grouped_cut

    fit, held = grouped_cut(texts, texts, (len(texts) - round(len(texts) * held_out),), rng)
    if not fit or not held:
        raise ValueError(f"{where}: {len(texts)} prompts cannot be cut into fit and held-out "
                         "parts; give each style at least 2 prompts that are not near twins")
    return fit, held


def refuse_twins(fit: ProbePrompts, threshold: ProbePrompts) -> None:
    """A threshold chosen on prompts the direction was fitted on (or their near twins)
    would be chosen on what the probe has learnt by heart: refused."""
    from vllm_safeinfer.data.twins import TwinIndex

    index = TwinIndex((t, None) for side in (fit.harmful, fit.safe)
                      for texts in side.values() for t in texts)
    for side in (threshold.harmful, threshold.safe):
        for style, texts in side.items():
            for text in texts:
                if index.twins_of(text):
                    raise ValueError(f"threshold prompt {text[:60]!r} (style {style!r}) is "
                                     "a prompt the probe's direction is fitted on, or its "
                                     "near twin: a threshold must be chosen on other prompts")
