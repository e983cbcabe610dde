"""The project's data module: vendored datasets load with their documented sizes and the
AdvBench split is fixed, disjoint and complete."""
from __future__ import annotations

import pytest

from vllm_safeinfer import data

EXPECTED_ROWS = {
    "advbench": 520,
    "advbench-custom50": 50,
    "advbench-eval": 220,
    "harmbench": 200,
    "strongreject": 313,
    "xstest": 250,
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
    assert len(split.evaluation) == data.EVALUATION == 220


def test_split_is_disjoint_and_complete(split: data.AdvBenchSplit) -> None:
    parts = [set(split.demonstrations), set(split.expert_train), set(split.evaluation)]
    assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
    assert parts[0] | parts[1] | parts[2] == set(data.advbench())


def test_split_is_deterministic(split: data.AdvBenchSplit) -> None:
    assert data.advbench_split() == split
    assert data.advbench_split(seed=data.SPLIT_SEED) == split
    assert data.advbench_split(seed=1).demonstrations != split.demonstrations


def test_eval_set_is_the_split_evaluation_part(split: data.AdvBenchSplit) -> None:
    assert [p.text for p in data.load_dataset("advbench-eval")] == [
        row.goal for row in split.evaluation
    ]


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
