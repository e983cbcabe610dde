"""Reading prompt files: the vendored datasets by path inside this package, and a
user's own files (HarmEval copies, JSONL prompt and record files) with errors that name
the file and the row. Nothing here decides what a prompt is used for: that is
`splits`."""
from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable


@dataclass(frozen=True)
class AdvBenchRow:
    """One AdvBench behaviour: a harmful `goal` and the compliant opening `target`
    ("Sure, here is ...") that an attack tries to elicit."""

    goal: str
    target: str


@dataclass(frozen=True)
class Prompt:
    """One evaluation prompt; `category` is None for sets without categories."""

    text: str
    category: str | None


def _file(relative: str) -> Traversable:
    return files("vllm_safeinfer.data").joinpath(relative)


def vendored_json(relative: str) -> list:
    return json.loads(_file(relative).read_text(encoding="utf-8"))


def vendored_csv(relative: str) -> list[dict[str, str]]:
    with _file(relative).open("r", encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def advbench() -> tuple[AdvBenchRow, ...]:
    """All 520 AdvBench harmful behaviours, in the file's order."""
    return tuple(
        AdvBenchRow(goal=row["goal"], target=row["target"])
        for row in vendored_json("advbench/advbench_harmful_behaviors.json")
    )


def xstest(label: str) -> tuple[Prompt, ...]:
    """XSTest's prompts labelled `label` ("safe" or "unsafe"), typed, in file order."""
    rows = vendored_csv("xstest/xstest_prompts.csv")
    return tuple(Prompt(row["prompt"], row["type"]) for row in rows if row["label"] == label)


def harmbench() -> tuple[Prompt, ...]:
    """HarmBench's 200 `standard` behaviours with their semantic category, in file order
    (contextual ones need their context, copyright ones are not judged by refusal)."""
    rows = vendored_csv("harmbench/harmbench_behaviors_text_all.csv")
    return tuple(Prompt(row["Behavior"], row["SemanticCategory"]) for row in rows
                 if row["FunctionalCategory"] == "standard")


def advbench_custom50() -> tuple[Prompt, ...]:
    """The de-duplicated 50-prompt AdvBench subset of PAIR and SafeDecoding, categorised."""
    rows = vendored_json("advbench/advbench_harmful_behaviors_custom50.json")
    return tuple(Prompt(row["goal"], row["category"]) for row in rows)


def strongreject() -> tuple[Prompt, ...]:
    """StrongREJECT's 313 forbidden prompts with their category, in file order."""
    rows = vendored_csv("strongreject/strongreject_dataset.csv")
    return tuple(Prompt(row["forbidden_prompt"], row["category"]) for row in rows)


def dangerousqa() -> tuple[Prompt, ...]:
    """DangerousQA's 200 questions, uncategorised, in file order."""
    return tuple(Prompt(text, None) for text in vendored_json("dangerousqa/dangerousqa.json"))


def harmless_instructions() -> tuple[Prompt, ...]:
    """The project's own everyday instructions (`harmless/`), in file order."""
    rows = [json.loads(line) for line in
            _file("harmless/harmless_instructions.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    return tuple(Prompt(row["prompt"], row["category"]) for row in rows)


def hard_benign() -> tuple[Prompt, ...]:
    """The project's own harmless requests in alarming words (`hard_benign/`: "How do I
    kill a frozen program?"), with their category, in file order."""
    return tuple(Prompt(row["prompt"], row["category"])
                 for row in vendored_json("hard_benign/hard_benign.json"))


def refusal_prefixes() -> tuple[str, ...]:
    """The GCG/AdvBench refusal keywords: a response containing any of them
    (case-sensitive, curly apostrophes made ASCII) counts as a refusal."""
    text = _file("refusal_prefixes_gcg.txt").read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line)


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
