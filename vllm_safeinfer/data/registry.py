"""The named prompt sets (`DATASETS`, from the vendored datasets, and `OWN_SETS`, the
project's own safe prompts) and what an evaluation may run on: every set by name,
unfiltered (`load_dataset`), and as an evaluation set with every prompt that the defence
was built or tuned on removed (`evaluation_set`, through `splits.leak_filter`). Which
prompts are safe (`SAFE_SETS`: a refusal there is over-refusal) and which only
calibrate (`CALIBRATION_SETS`) is decided here too."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from vllm_safeinfer.data.benign import hard_benign_prompts, harmless_prompts
from vllm_safeinfer.data.readers import (
    Prompt,
    advbench,
    advbench_custom50,
    dangerousqa,
    harmbench,
    load_harmeval,
    load_prompt_file,
    strongreject,
    xstest,
)
from vllm_safeinfer.data.splits import (
    advbench_split,
    hard_benign_split,
    harmbench_split,
    harmless_split,
    leak_filter,
    xstest_split,
)

ADVBENCH = "advbench"
XSTEST = "xstest"
# The named sets of the vendored datasets.
DATASETS: tuple[str, ...] = (
    ADVBENCH,
    "advbench-custom50",
    "advbench-eval",
    "advbench-calibration",
    "harmbench",
    "harmbench-eval",
    "strongreject",
    XSTEST,
    "xstest-eval",
    "xstest-calibration",
    "xstest-unsafe",
    "xstest-unsafe-eval",
    "xstest-unsafe-calibration",
    "dangerousqa",
)
# The project's own safe sets, each less every twin of a prompt of `DATASETS`
# (`benign`), and their evaluation parts (`splits.harmless_split`, `hard_benign_split`).
OWN_SETS: tuple[str, ...] = ("harmless", "harmless-eval", "hard-benign", "hard-benign-eval")
# Evaluation sets also name a user's local files: HarmEval is gated on the hub.
HARMEVAL_PREFIX = "harmeval:"
JSONL_PREFIX = "jsonl:"
# Sets of safe prompts: a refusal there is over-refusal, not a defence.
SAFE_SETS = frozenset({XSTEST, "xstest-eval", "xstest-calibration", *OWN_SETS})
# Sets the strengths (and XSTest's, the harm probe) are tuned on: no evaluation set
# unless the user says so.
CALIBRATION_SETS = frozenset({"advbench-calibration", "xstest-calibration",
                              "xstest-unsafe-calibration"})
# As evaluation sets, the whole-dataset names mean their held-out parts.
_EVALUATION_PARTS = {ADVBENCH: "advbench-eval", XSTEST: "xstest-eval",
                     "xstest-unsafe": "xstest-unsafe-eval", "harmbench": "harmbench-eval",
                     "harmless": "harmless-eval", "hard-benign": "hard-benign-eval"}
HARMEVAL_CATEGORIES: tuple[str, ...] = (
    "Illegal Activity", "Child Abuse Content", "Physical Harm", "Economic Harm",
    "Political Campaigning", "Malware", "Privacy Violation Activity",
    "Tailored Financial Advice", "Fraud/Deception", "Hate/Harass/Violence", "Adult Content",
)


@dataclass(frozen=True)
class EvaluationSet:
    """The prompts an evaluation of `name` runs on: the set's `rows` less those with a
    twin in a part the defence was built or tuned on (`dropped`: rows by reason)."""

    name: str
    prompts: tuple[Prompt, ...]
    rows: int
    dropped: Mapping[str, int] = field(default_factory=dict)


def load_dataset(name: str) -> tuple[Prompt, ...]:
    """Prompts of a named set (see `DATASETS` and `OWN_SETS`), unfiltered.

    `harmbench` is HarmBench's 200 `standard` behaviours (contextual ones need their
    context, copyright ones are not judged by refusal), `harmbench-eval` those outside
    the harm probe's part (`harmbench_split()`); `xstest` is XSTest's 250 safe prompts
    (over-refusal), `xstest-calibration` and `xstest-eval` its halves (`xstest_split()`),
    `xstest-unsafe` its 200 unsafe contrasts, `xstest-unsafe-calibration` and
    `xstest-unsafe-eval` their halves; `advbench-eval` and `advbench-calibration` are
    those parts of `advbench_split()`; `harmless` and `hard-benign` are the project's
    own safe sets (`benign`), `harmless-eval` and `hard-benign-eval` the parts of them
    that the harm probe is neither fitted nor thresholded on.
    """
    if name == ADVBENCH:
        return tuple(Prompt(row.goal, None) for row in advbench())
    if name == "advbench-custom50":
        return advbench_custom50()
    if name == "advbench-eval":
        return tuple(Prompt(row.goal, None) for row in advbench_split().evaluation)
    if name == "advbench-calibration":
        return tuple(Prompt(row.goal, None) for row in advbench_split().calibration)
    if name == "harmbench":
        return harmbench()
    if name == "harmbench-eval":
        return harmbench_split()[1]
    if name == "strongreject":
        return strongreject()
    if name in (XSTEST, "xstest-unsafe"):
        return xstest("safe" if name == XSTEST else "unsafe")
    if name in ("xstest-calibration", "xstest-eval"):
        return xstest_split()[name == "xstest-eval"]
    if name in ("xstest-unsafe-calibration", "xstest-unsafe-eval"):
        return xstest_split(label="unsafe")[name == "xstest-unsafe-eval"]
    if name == "dangerousqa":
        return dangerousqa()
    if name in ("harmless", "hard-benign"):
        return harmless_prompts() if name == "harmless" else hard_benign_prompts()
    if name in ("harmless-eval", "hard-benign-eval"):
        return (harmless_split() if name == "harmless-eval" else hard_benign_split())[2]
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join((*DATASETS, *OWN_SETS))}")


def evaluation_set(name: str, *, allow_calibration_prompts: bool = False) -> EvaluationSet:
    """The prompts an evaluation of `name` runs on, every prompt with a twin in the
    demonstration, expert-training, harm-probe or calibration parts removed.

    `advbench`, `harmbench`, `xstest`, `xstest-unsafe`, `harmless` and `hard-benign`
    mean their evaluation parts; `harmeval:PATH` a local copy of HarmEval; `jsonl:PATH`
    a file of `{"prompt", "category"}` objects; other names as `load_dataset`. The
    calibration sets are refused unless `allow_calibration_prompts` (calibration
    itself), which also keeps prompts whose twin is a calibration or probe-threshold
    prompt.
    """
    if name.startswith(HARMEVAL_PREFIX):
        prompts = load_harmeval(name[len(HARMEVAL_PREFIX):])
    elif name.startswith(JSONL_PREFIX):
        prompts = load_prompt_file(name[len(JSONL_PREFIX):])
    else:
        if name in CALIBRATION_SETS and not allow_calibration_prompts:
            raise ValueError(f"{name!r} holds the prompts calibration tunes the strengths "
                             "on, so it measures nothing held out; evaluate on "
                             f"{', '.join(sorted(_EVALUATION_PARTS))} or other sets, or pass "
                             "--allow-calibration-prompts")
        prompts = load_dataset(_EVALUATION_PARTS.get(name, name))
    kept, dropped = leak_filter(prompts, calibration=not allow_calibration_prompts)
    if not kept:
        raise ValueError(f"every prompt of {name!r} is a twin of a prompt the defence was "
                         f"built or tuned on ({dropped})")
    return EvaluationSet(name, kept, len(prompts), dropped)
