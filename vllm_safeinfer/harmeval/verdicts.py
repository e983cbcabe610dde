"""What every judge gives and how it fails: a `Verdict` per (question, response), the
`Judge` interface runs and reports rely on, and `JudgeError`, which stops a run. A
verdict says what the judge could not decide (`None`) instead of guessing, so reports
can count it apart."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

# The label of a response the judge endpoint refused to judge (see `llm_judge`).
ERROR = "error"


@dataclass(frozen=True)
class Verdict:
    """One judge's reading of one response.

    `unsafe` is attack success if the prompt was harmful, `None` when this judge cannot
    say (e.g. its answer was unparseable); `refused` is `None` when the judge does not
    classify refusals.
    """

    judge: str
    label: str
    unsafe: bool | None
    refused: bool | None

    def __post_init__(self) -> None:
        if not isinstance(self.judge, str) or not isinstance(self.label, str):
            raise ValueError(f"judge and label must be strings: {self!r}")
        for name in ("unsafe", "refused"):
            if getattr(self, name) not in (True, False, None):
                raise ValueError(f"{name} must be true, false or null: {self!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Verdict:
        return cls(judge=d["judge"], label=d["label"], unsafe=d["unsafe"], refused=d["refused"])


class Judge(Protocol):
    """What every judge offers, so runs and reports treat them alike."""

    @property
    def name(self) -> str: ...

    def judge(self, question: str, response: str) -> Verdict: ...

    def judge_many(
        self, pairs: Sequence[tuple[str, str]], progress: bool = False
    ) -> list[Verdict]: ...


class JudgeError(RuntimeError):
    """The judge endpoint is misconfigured, answered nonsense, or stayed unreachable: no
    verdict can be had, so the run stops."""
