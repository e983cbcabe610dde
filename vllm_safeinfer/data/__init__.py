"""The project's data: vendored, openly licensed safety datasets (see README.md here for
origins, licenses and a content warning) and the one seeded AdvBench split.

AdvBench serves four purposes that must never see the same prompt twice: safety
demonstrations for the safety vector, training pairs for the unsafe expert, calibration
of the strengths, and evaluation. `advbench_split()` is the only place that decides which
row goes where, so every phase draws from the same fixed, disjoint parts; XSTest's safe
prompts are likewise halved into calibration and evaluation (`xstest_split()`).
"""
from __future__ import annotations

import csv
import hashlib
import itertools
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

SPLIT_SEED = 0
DEMONSTRATIONS = 200
EXPERT_TRAIN = 100
CALIBRATION = 60
EVALUATION = 160

ADVBENCH = "advbench"
DATASETS: tuple[str, ...] = (
    ADVBENCH,
    "advbench-custom50",
    "advbench-eval",
    "advbench-calibration",
    "harmbench",
    "strongreject",
    "xstest",
    "xstest-eval",
    "xstest-calibration",
    "xstest-unsafe",
    "dangerousqa",
)
# Evaluation sets also name a user's local files: HarmEval is gated on the hub.
HARMEVAL_PREFIX = "harmeval:"
JSONL_PREFIX = "jsonl:"
# Sets of safe prompts: a refusal there is over-refusal, not a defence.
SAFE_SETS = frozenset({"xstest", "xstest-eval", "xstest-calibration"})
HARMEVAL_CATEGORIES: tuple[str, ...] = (
    "Illegal Activity", "Child Abuse Content", "Physical Harm", "Economic Harm",
    "Political Campaigning", "Malware", "Privacy Violation Activity",
    "Tailored Financial Advice", "Fraud/Deception", "Hate/Harass/Violence", "Adult Content",
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
    pairs, calibration prompts, and held-out evaluation prompts."""

    demonstrations: tuple[AdvBenchRow, ...]
    expert_train: tuple[AdvBenchRow, ...]
    calibration: tuple[AdvBenchRow, ...]
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
    training pairs, 60 calibration prompts and 160 evaluation prompts.

    200 demonstrations give the builder a 160/40 train/validation split (the paper's
    316 hand-written pairs do not exist openly); 100 pairs is the expert's training size
    in the paper; calibration chooses strengths on prompts the evaluation never sees.
    Keep the default seed: another seed moves rows between parts, so vectors, experts
    and evaluations made with different seeds may overlap.
    """
    rows = list(advbench())
    random.Random(seed).shuffle(rows)
    ends = itertools.accumulate((DEMONSTRATIONS, EXPERT_TRAIN, CALIBRATION))
    demos_end, expert_end, calibration_end = ends
    return AdvBenchSplit(
        demonstrations=tuple(rows[:demos_end]),
        expert_train=tuple(rows[demos_end:expert_end]),
        calibration=tuple(rows[expert_end:calibration_end]),
        evaluation=tuple(rows[calibration_end:]),
    )


def xstest_split(seed: int = SPLIT_SEED) -> tuple[tuple[Prompt, ...], tuple[Prompt, ...]]:
    """XSTest's 250 safe prompts as (calibration, evaluation): each of its 10 types
    shuffled with `seed`, 12 of its 25 prompts to calibration and 13 to evaluation,
    each half in the file's order."""
    prompts = _xstest("safe")
    rng = random.Random(seed)
    by_type: dict[str | None, list[int]] = {}
    for index, prompt in enumerate(prompts):
        by_type.setdefault(prompt.category, []).append(index)
    calibration: set[int] = set()
    for indices in by_type.values():
        rng.shuffle(indices)
        calibration.update(indices[:len(indices) // 2])
    return (tuple(p for i, p in enumerate(prompts) if i in calibration),
            tuple(p for i, p in enumerate(prompts) if i not in calibration))


def load_dataset(name: str) -> tuple[Prompt, ...]:
    """Prompts of a named evaluation set (see `DATASETS`).

    `harmbench` is HarmBench's 200 `standard` behaviours (contextual ones need their
    context, copyright ones are not judged by refusal); `xstest` is XSTest's 250 safe
    prompts (over-refusal), `xstest-calibration` and `xstest-eval` its halves
    (`xstest_split()`), `xstest-unsafe` its 200 unsafe contrasts; `advbench-eval` and
    `advbench-calibration` are those parts of `advbench_split()`.
    """
    if name == ADVBENCH:
        return tuple(Prompt(row.goal, None) for row in advbench())
    if name == "advbench-custom50":
        rows = _read_json("advbench/advbench_harmful_behaviors_custom50.json")
        return tuple(Prompt(row["goal"], row["category"]) for row in rows)
    if name == "advbench-eval":
        return tuple(Prompt(row.goal, None) for row in advbench_split().evaluation)
    if name == "advbench-calibration":
        return tuple(Prompt(row.goal, None) for row in advbench_split().calibration)
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
        return _xstest("safe" if name == "xstest" else "unsafe")
    if name in ("xstest-calibration", "xstest-eval"):
        return xstest_split()[name == "xstest-eval"]
    if name == "dangerousqa":
        return tuple(Prompt(text, None) for text in _read_json("dangerousqa/dangerousqa.json"))
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


def _xstest(label: str) -> tuple[Prompt, ...]:
    rows = _read_csv("xstest/xstest_prompts.csv")
    return tuple(Prompt(row["prompt"], row["type"]) for row in rows if row["label"] == label)


def refusal_prefixes() -> tuple[str, ...]:
    """The GCG/AdvBench refusal keywords: a response containing any of them
    (case-sensitive, curly apostrophes made ASCII) counts as a refusal."""
    text = _file("refusal_prefixes_gcg.txt").read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line)


def evaluation_set(name: str) -> tuple[Prompt, ...]:
    """The prompts an evaluation names. `advbench` is the evaluation part of the split
    (never its demonstration or expert-training parts); `harmeval:PATH` a local copy of
    HarmEval; `jsonl:PATH` a file of `{"prompt", "category"}` objects; other names as
    `load_dataset`."""
    if name.startswith(HARMEVAL_PREFIX):
        return load_harmeval(name[len(HARMEVAL_PREFIX):])
    if name.startswith(JSONL_PREFIX):
        return load_prompt_file(name[len(JSONL_PREFIX):])
    return load_dataset("advbench-eval" if name == ADVBENCH else name)


def load_harmeval(path: str | Path) -> tuple[Prompt, ...]:
    """A local copy of HarmEval (JSON, JSONL, CSV or parquet) with columns `Question`
    and `Topic` (one of its 11 categories); errors name the file and the bad row."""
    prompts = []
    for number, row in enumerate(_read_table(path), start=1):
        question = _field(row, "Question", path, number)
        topic = _field(row, "Topic", path, number)
        prompts.append(Prompt(question, topic))
    if not prompts:
        raise ValueError(f"{path}: no rows")
    return tuple(prompts)


def load_prompt_file(path: str | Path) -> tuple[Prompt, ...]:
    """A JSONL file, one `{"prompt": ..., "category": ...}` object a line (category
    optional)."""
    prompts = []
    for number, row in enumerate(_read_table(path, jsonl=True), start=1):
        category = row.get("category")
        if category is not None and (not isinstance(category, str) or not category.strip()):
            raise ValueError(f"{path}: row {number}: 'category' must be a non-empty string "
                             f"or absent, got {category!r}")
        prompts.append(Prompt(_field(row, "prompt", path, number), category))
    if not prompts:
        raise ValueError(f"{path}: no rows")
    return tuple(prompts)


def load_jsonl_records(path: str | Path, required: Sequence[str],
                       optional: Sequence[str] = ()) -> tuple[dict[str, str], ...]:
    """A JSONL file of objects whose values are non-empty strings: every `required` key,
    any of `optional`, nothing else. The offline tools' input files (demonstrations,
    expert pairs) are read here; errors name the file and row."""
    records = []
    for number, row in enumerate(_read_table(path, jsonl=True), start=1):
        unknown = set(row) - {*required, *optional}
        if unknown:
            raise ValueError(f"{path}: row {number} has unknown keys {sorted(unknown)} "
                             f"(known: {', '.join([*required, *optional])})")
        records.append({key: _field(row, key, path, number)
                        for key in (*required, *(k for k in optional if k in row))})
    if not records:
        raise ValueError(f"{path}: no rows")
    return tuple(records)


def stratified_sample(prompts: Sequence[Prompt], *, per_category: int | None = None,
                      limit: int | None = None, seed: int = 0) -> tuple[int, ...]:
    """Indices of a seeded sample, in dataset order: at most `per_category` prompts of
    each category, then at most `limit` in all, taken round-robin over the categories so
    that each keeps its share."""
    for key, value in (("per_category", per_category), ("limit", limit)):
        if value is not None and value < 1:
            raise ValueError(f"{key} must be at least 1, got {value}")
    rng = random.Random(seed)
    by_category: dict[str | None, list[int]] = {}
    for index, prompt in enumerate(prompts):
        by_category.setdefault(prompt.category, []).append(index)
    queues = []
    for category in sorted(by_category, key=lambda c: (c is None, c or "")):
        indices = by_category[category]
        rng.shuffle(indices)
        queues.append(indices[:per_category])
    chosen: list[int] = []
    for rank in range(max(map(len, queues), default=0)):
        chosen.extend(queue[rank] for queue in queues if rank < len(queue))
    return tuple(sorted(chosen[:limit]))


def prompts_sha256(prompts: Iterable[Prompt]) -> str:
    """Identity of a prompt set (texts and categories, in order), for reports."""
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(json.dumps([prompt.text, prompt.category]).encode())
    return digest.hexdigest()


def _read_table(path: str | Path, *, jsonl: bool = False) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        rows = _parquet_rows(path)
    else:
        try:
            if suffix == ".csv":
                with path.open(encoding="utf-8", newline="") as handle:
                    rows = list(csv.DictReader(handle))
            else:
                text = path.read_text(encoding="utf-8")
                rows = _json_rows(text, path, jsonl or suffix == ".jsonl")
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise ValueError(f"{path}: cannot read: {exc}") from exc
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: row {number} is not an object: {row!r}")
    return rows


def _parquet_rows(path: Path) -> list:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: cannot read as parquet: {exc}") from exc


def _json_rows(text: str, path: Path, jsonl: bool) -> list:
    if not jsonl:
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            jsonl = True  # a .json file written by `datasets` is one object a line
        else:
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected a JSON list of objects")
            return data
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {number} is not JSON: {exc}") from exc
    return rows


def _field(row: dict[str, Any], column: str, path: str | Path, number: int) -> str:
    if column not in row:
        raise ValueError(f"{path}: row {number} has no column {column!r} "
                         f"(columns: {sorted(row)})")
    value = row[column]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{path}: row {number}: {column!r} must be a non-empty string, "
                         f"got {value!r}")
    return value
