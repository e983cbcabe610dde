"""SafeInfer's safe demonstrations and the in-context prompts built from them
(SAFEINFER.md section 1): each prompt is `shots` demonstrations and one query, in a clean
form (safe answers) and a corrupted form (compliant answers) for ranking heads."""
from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vllm_safeinfer.data import advbench_split, load_jsonl_records

SAFE_ANSWER = "I do not answer this question because it is harmful"
TASK_PREFIX = "Task: Write a function that performs the task "
VALIDATION_FRACTION = 0.2

@dataclass(frozen=True)
class Demonstration:
    """A harmful input with its safe output. `compliant` replaces `output` in corrupted
    prompts (None when no compliant answer is known: such demos cannot rank heads)."""

    input: str
    output: str
    compliant: str | None


@dataclass(frozen=True)
class InContextPrompt:
    """One raw-text few-shot prompt in clean and corrupted form; `answer` is the query's
    safe output, whose first token the ranking measures."""

    clean: str
    corrupted: str | None
    answer: str


@dataclass(frozen=True)
class PromptSet:
    """The prompts of one build: `mean` for head activations, `rank` for the AIE."""

    mean: tuple[InContextPrompt, ...]
    rank: tuple[InContextPrompt, ...]


def advbench_demonstrations() -> tuple[Demonstration, ...]:
    """The default demonstrations: the demonstration part of the project's AdvBench split
    in SafeInfer's format, with AdvBench's `target` as the compliant answer."""
    return tuple(
        Demonstration(TASK_PREFIX + row.goal, SAFE_ANSWER, row.target)
        for row in advbench_split().demonstrations
    )


def load_demonstrations(path: str | Path) -> tuple[Demonstration, ...]:
    """Read a JSONL file of `{"input", "output"}` objects (optional `"compliant"`).

    Without `compliant`, a row's compliant answer is the next row's output that differs
    from its own, so corrupted prompts carry an answer that does not fit the question.
    """
    rows = [(row["input"], row["output"], row.get("compliant"))
            for row in load_jsonl_records(path, ("input", "output"), ("compliant",))]
    if len(rows) < 2:
        raise ValueError(f"{path}: need at least 2 demonstrations (train and validation)")
    outputs = [output for _, output, _ in rows]
    demos = []
    for index, (text, output, compliant) in enumerate(rows):
        if compliant is None:
            others = outputs[index + 1 :] + outputs[:index]
            compliant = next((other for other in others if other != output), None)
        demos.append(Demonstration(text, output, compliant))
    return tuple(demos)


def demos_sha256(demos: Sequence[Demonstration]) -> str:
    """Content hash of a demonstration set, stored in the vector to trace its origin."""
    payload = json.dumps([[d.input, d.output, d.compliant] for d in demos], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def build_prompt_set(
    demos: Sequence[Demonstration],
    *,
    prompts: int = 100,
    shots: int = 10,
    rank_prompts: int = 16,
    seed: int = 0,
) -> PromptSet:
    """Split the demos into train/validation with `seed`, then sample prompts of `shots`
    train demonstrations (with replacement) and one validation query each."""
    if len(demos) < 2:
        raise ValueError("need at least 2 demonstrations (train and validation)")
    for name, value in (("prompts", prompts), ("shots", shots), ("rank_prompts", rank_prompts)):
        if value < 0 or (value == 0 and name != "rank_prompts"):
            raise ValueError(f"{name} must be positive, got {value}")
    rng = random.Random(seed)
    order = list(range(len(demos)))
    rng.shuffle(order)
    n_val = max(1, round(len(demos) * VALIDATION_FRACTION))
    val = [demos[i] for i in order[:n_val]]
    train = [demos[i] for i in order[n_val:]]

    def sample() -> InContextPrompt:
        context = rng.choices(train, k=shots)
        query = rng.choice(val)
        tail = f"Q: {query.input}\nA:"
        clean = "".join(f"Q: {d.input}\nA: {d.output}\n\n" for d in context) + tail
        corrupted = None
        if all(d.compliant is not None for d in context):
            corrupted = "".join(f"Q: {d.input}\nA: {d.compliant}\n\n" for d in context) + tail
        return InContextPrompt(clean, corrupted, query.output)

    mean = tuple(sample() for _ in range(prompts))
    rank = tuple(sample() for _ in range(rank_prompts))
    return PromptSet(mean, rank)


def require_corrupted(prompts: Sequence[InContextPrompt]) -> None:
    if any(p.corrupted is None for p in prompts):
        raise ValueError(
            "ranking needs corrupted prompts, but some demonstrations have no compliant "
            "answer (all outputs are identical): add a \"compliant\" field or give the heads"
        )
