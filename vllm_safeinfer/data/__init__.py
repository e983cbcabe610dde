"""The project's data: vendored, openly licensed safety datasets (see README.md here for
origins, licenses and a content warning) and the one seeded AdvBench split.

AdvBench serves three purposes that must never see the same prompt twice: safety
demonstrations for the safety vector, training pairs for the unsafe expert, and
evaluation. `advbench_split()` is the only place that decides which row goes where, so
every phase draws from the same fixed, disjoint parts.
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from importlib.resources import files
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

SPLIT_SEED = 0
DEMONSTRATIONS = 200
EXPERT_TRAIN = 100
EVALUATION = 220

ADVBENCH = "advbench"
DATASETS: tuple[str, ...] = (
    ADVBENCH,
    "advbench-custom50",
    "advbench-eval",
    "harmbench",
    "strongreject",
    "xstest",
    "xstest-unsafe",
    "dangerousqa",
)


@dataclass(frozen=True)
class AdvBenchRow:
    """One AdvBench behaviour: a harmful `goal` and the compliant opening `target`
    ("Sure, here is ...") that an attack tries to elicit."""

    goal: str
    target: str


@dataclass(frozen=True)
class AdvBenchSplit:
    """Disjoint parts of AdvBench: safety demonstrations, the unsafe expert's training
    pairs, and held-out evaluation prompts."""

    demonstrations: tuple[AdvBenchRow, ...]
    expert_train: tuple[AdvBenchRow, ...]
    evaluation: tuple[AdvBenchRow, ...]


@dataclass(frozen=True)
class Prompt:
    """One evaluation prompt; `category` is None for sets without categories."""

    text: str
    category: str | None


def _file(relative: str) -> Traversable:
    return files(__name__).joinpath(relative)


def _read_json(relative: str) -> list:
    return json.loads(_file(relative).read_text(encoding="utf-8"))


def _read_csv(relative: str) -> list[dict[str, str]]:
    with _file(relative).open("r", encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def advbench() -> tuple[AdvBenchRow, ...]:
    """All 520 AdvBench harmful behaviours, in the file's order."""
    return tuple(
        AdvBenchRow(goal=row["goal"], target=row["target"])
        for row in _read_json("advbench/advbench_harmful_behaviors.json")
    )


def advbench_split(seed: int = SPLIT_SEED) -> AdvBenchSplit:
    """Shuffle AdvBench with `seed` and cut it into 200 demonstrations, 100 expert
    training pairs and 220 evaluation prompts.

    200 demonstrations give the builder a 160/40 train/validation split (the paper's
    316 hand-written pairs do not exist openly); 100 pairs is the expert's training size
    in the paper; the remaining 220 rows stay unseen for evaluation. Keep the default
    seed: another seed moves rows between parts, so vectors, experts and evaluations
    made with different seeds may overlap.
    """
    rows = list(advbench())
    random.Random(seed).shuffle(rows)
    demos_end = DEMONSTRATIONS
    expert_end = demos_end + EXPERT_TRAIN
    return AdvBenchSplit(
        demonstrations=tuple(rows[:demos_end]),
        expert_train=tuple(rows[demos_end:expert_end]),
        evaluation=tuple(rows[expert_end:]),
    )


def load_dataset(name: str) -> tuple[Prompt, ...]:
    """Prompts of a named evaluation set (see `DATASETS`).

    `harmbench` is HarmBench's 200 `standard` behaviours (contextual ones need their
    context, copyright ones are not judged by refusal); `xstest` is XSTest's 250 safe
    prompts (over-refusal), `xstest-unsafe` its 200 unsafe contrasts; `advbench-eval` is
    the evaluation part of `advbench_split()`.
    """
    if name == ADVBENCH:
        return tuple(Prompt(row.goal, None) for row in advbench())
    if name == "advbench-custom50":
        rows = _read_json("advbench/advbench_harmful_behaviors_custom50.json")
        return tuple(Prompt(row["goal"], row["category"]) for row in rows)
    if name == "advbench-eval":
        return tuple(Prompt(row.goal, None) for row in advbench_split().evaluation)
    if name == "harmbench":
        rows = _read_csv("harmbench/harmbench_behaviors_text_all.csv")
        return tuple(
            Prompt(row["Behavior"], row["SemanticCategory"])
            for row in rows
            if row["FunctionalCategory"] == "standard"
        )
    if name == "strongreject":
        rows = _read_csv("strongreject/strongreject_dataset.csv")
        return tuple(Prompt(row["forbidden_prompt"], row["category"]) for row in rows)
    if name in ("xstest", "xstest-unsafe"):
        label = "safe" if name == "xstest" else "unsafe"
        rows = _read_csv("xstest/xstest_prompts.csv")
        return tuple(Prompt(row["prompt"], row["type"]) for row in rows if row["label"] == label)
    if name == "dangerousqa":
        return tuple(Prompt(text, None) for text in _read_json("dangerousqa/dangerousqa.json"))
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


def refusal_prefixes() -> tuple[str, ...]:
    """The GCG/AdvBench refusal keywords: a response containing any of them
    (case-sensitive, curly apostrophes made ASCII) counts as a refusal."""
    text = _file("refusal_prefixes_gcg.txt").read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line)
