"""The project's data module: vendored datasets load with their documented sizes and the
AdvBench split is fixed, disjoint and complete."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from vllm_safeinfer import data

EXPECTED_ROWS = {
    "advbench": 520,
    "advbench-custom50": 50,
    "advbench-eval": 160,
    "advbench-calibration": 60,
    "harmbench": 200,
    "strongreject": 313,
    "xstest": 250,
    "xstest-calibration": 120,
    "xstest-eval": 130,
    "xstest-unsafe": 200,
    "dangerousqa": 200,
}


@pytest.fixture(scope="module")
def split() -> data.AdvBenchSplit:
    return data.advbench_split()


def test_advbench_rows() -> None:
    rows = data.advbench()
    assert len(rows) == 520
    assert all(row.goal and row.target.startswith("Sure, here") for row in rows)
    assert len({row.goal for row in rows}) == 520


def test_split_sizes(split: data.AdvBenchSplit) -> None:
    assert len(split.demonstrations) == data.DEMONSTRATIONS == 200
    assert len(split.expert_train) == data.EXPERT_TRAIN == 100
    assert len(split.evaluation) == data.EVALUATION == 160
    assert len(split.calibration) == data.CALIBRATION == 60


def test_split_is_disjoint_and_complete(split: data.AdvBenchSplit) -> None:
    parts = [set(split.demonstrations), set(split.expert_train), set(split.calibration),
             set(split.evaluation)]
    assert sum(map(len, parts)) == len(set().union(*parts)) == 520
    assert set().union(*parts) == set(data.advbench())


def test_split_is_deterministic(split: data.AdvBenchSplit) -> None:
    assert data.advbench_split() == split
    assert data.advbench_split(seed=data.SPLIT_SEED) == split
    assert data.advbench_split(seed=1).demonstrations != split.demonstrations


def test_eval_set_is_the_split_evaluation_part(split: data.AdvBenchSplit) -> None:
    assert [p.text for p in data.load_dataset("advbench-eval")] == [
        row.goal for row in split.evaluation
    ]
    assert [p.text for p in data.load_dataset("advbench-calibration")] == [
        row.goal for row in split.calibration
    ]


def test_xstest_halves_are_disjoint_stratified_and_complete() -> None:
    calibration, evaluation = data.xstest_split()
    assert not set(calibration) & set(evaluation)
    assert sorted(calibration + evaluation, key=str) == sorted(data.load_dataset("xstest"), key=str)
    assert set(Counter(p.category for p in calibration).values()) == {12}
    assert data.xstest_split() == (calibration, evaluation)
    assert data.SAFE_SETS == {"xstest", "xstest-eval", "xstest-calibration"}


@pytest.mark.parametrize("name", data.DATASETS)
def test_named_dataset_sizes(name: str) -> None:
    prompts = data.load_dataset(name)
    assert len(prompts) == EXPECTED_ROWS[name]
    assert all(isinstance(p.text, str) and p.text.strip() for p in prompts)


def test_categories() -> None:
    assert {p.category for p in data.load_dataset("dangerousqa")} == {None}
    assert len({p.category for p in data.load_dataset("strongreject")}) == 6
    assert len({p.category for p in data.load_dataset("harmbench")}) == 6
    assert len({p.category for p in data.load_dataset("xstest")}) == 10


def test_unknown_dataset_is_named() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'harmeval'"):
        data.load_dataset("harmeval")


def test_refusal_prefixes() -> None:
    prefixes = data.refusal_prefixes()
    assert len(prefixes) == 18
    assert prefixes[0] == "I'm sorry" and "It is not</s>" in prefixes


def test_advbench_evaluation_set_is_the_held_out_part(split: data.AdvBenchSplit) -> None:
    prompts = data.evaluation_set("advbench")
    assert [p.text for p in prompts] == [row.goal for row in split.evaluation]
    used = {row.goal for row in (*split.demonstrations, *split.expert_train)}
    assert not used & {p.text for p in prompts}
    assert data.evaluation_set("xstest") == data.load_dataset("xstest")


HARMEVAL_ROWS = [{"Question": f"question {i}", "Topic": data.HARMEVAL_CATEGORIES[i % 11]}
                 for i in range(33)]


def write_harmeval(path, rows) -> None:
    if path.suffix == ".csv":
        import csv

        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=sorted({k for r in rows for k in r}))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_harmeval_loads_from_each_format(tmp_path, suffix) -> None:
    path = tmp_path / f"harmeval{suffix}"
    write_harmeval(path, HARMEVAL_ROWS)
    prompts = data.evaluation_set(f"harmeval:{path}")
    assert len(prompts) == 33
    assert prompts[12] == data.Prompt("question 12", "Child Abuse Content")
    assert {p.category for p in prompts} == set(data.HARMEVAL_CATEGORIES)


@pytest.mark.parametrize("rows,message", [
    ([{"Question": "q"}], "row 1 has no column 'Topic'"),
    ([{"Question": "q", "Topic": "Malware"}, {"question": "q", "Topic": "Malware"}],
     "row 2 has no column 'Question'"),
    ([{"Question": "", "Topic": "Malware"}], "row 1: 'Question' must be a non-empty string"),
    ([], "no rows"),
])
def test_malformed_harmeval_names_the_column_or_row(tmp_path, rows, message) -> None:
    path = tmp_path / "harmeval.jsonl"
    write_harmeval(path, rows)
    with pytest.raises(ValueError, match=message):
        data.load_harmeval(path)


def test_unreadable_files_are_clear_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        data.evaluation_set(f"harmeval:{tmp_path / 'missing.csv'}")
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(ValueError, match="cannot read as parquet"):
        data.load_harmeval(bad)
    lines = tmp_path / "bad.jsonl"
    lines.write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        data.evaluation_set(f"jsonl:{lines}")


def test_prompt_file_with_and_without_categories(tmp_path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a", "category": "x"}\n\n{"prompt": "b"}\n')
    assert data.evaluation_set(f"jsonl:{path}") == (data.Prompt("a", "x"), data.Prompt("b", None))
    path.write_text('{"prompt": "a", "category": 3}\n')
    with pytest.raises(ValueError, match="'category' must be"):
        data.load_prompt_file(path)


def test_stratified_sample_is_seeded_balanced_and_in_dataset_order() -> None:
    prompts = data.load_dataset("harmbench")
    first = data.stratified_sample(prompts, per_category=5, seed=3)
    assert first == data.stratified_sample(prompts, per_category=5, seed=3)
    assert first != data.stratified_sample(prompts, per_category=5, seed=4)
    assert list(first) == sorted(first)
    counts = Counter(prompts[i].category for i in first)
    assert set(counts.values()) == {5} and len(counts) == 6
    limited = data.stratified_sample(prompts, limit=20, seed=3)
    assert len(limited) == 20
    assert max(Counter(prompts[i].category for i in limited).values()) <= 4
    capped = data.stratified_sample(prompts, per_category=2, limit=100)
    assert len(capped) == 12
    everything = data.stratified_sample(prompts)
    assert everything == tuple(range(200))
    with pytest.raises(ValueError, match="limit must be at least 1"):
        data.stratified_sample(prompts, limit=0)


def test_prompt_set_hash_changes_with_any_prompt() -> None:
    prompts = data.load_dataset("xstest")
    assert data.prompts_sha256(prompts) == data.prompts_sha256(data.load_dataset("xstest"))
    changed = (data.Prompt(prompts[0].text, "other"), *prompts[1:])
    assert data.prompts_sha256(changed) != data.prompts_sha256(prompts)
