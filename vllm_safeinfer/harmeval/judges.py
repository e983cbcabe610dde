"""Judges by name. Three judges with one interface (`verdicts.Judge`), because no single
one is trustworthy alone: the GCG refusal keywords and XSTest's string match
(`string_judges`), and an LLM judge behind an OpenAI-compatible server (`llm_judge`).
Each judge's module is imported when it is made, so naming the judges (the command
line's help) needs none of their dependencies."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vllm_safeinfer.harmeval.verdicts import Judge

JUDGES = ("keyword", "xstest", "openai")


def make_judges(
    names: Sequence[str],
    *,
    judge_url: str | None = None,
    judge_model: str | None = None,
    cache_path: Path | None = None,
    api_key: str | None = None,
    retry_errors: bool = False,
) -> list[Judge]:
    """Judges by name (see `JUDGES`), in the order given."""
    if len(set(names)) != len(names):
        raise ValueError(f"judge named twice in {list(names)}")
    judges: list[Judge] = []
    for name in names:
        if name == "keyword":
            from vllm_safeinfer.harmeval.string_judges import KeywordJudge

            judges.append(KeywordJudge())
        elif name == "xstest":
            from vllm_safeinfer.harmeval.string_judges import XSTestJudge

            judges.append(XSTestJudge())
        elif name == "openai":
            if not judge_url or not judge_model:
                raise ValueError(
                    "judge 'openai' needs a judge URL (an OpenAI-compatible server, e.g. "
                    "http://127.0.0.1:8000) and the judge model name that server serves"
                )
            from vllm_safeinfer.harmeval.llm_judge import OpenAIJudge

            judges.append(OpenAIJudge(judge_url, judge_model, cache_path=cache_path,
                                      api_key=api_key, retry_errors=retry_errors))
        else:
            raise ValueError(f"unknown judge {name!r}; known: {', '.join(JUDGES)}")
    return judges
