"""The project's own safe prompts: everyday instructions (`harmless/`) and harmless
requests in alarming words (`hard_benign/`). They fit and calibrate harm probes and
refusal directions, so each loses every near twin of a prompt of the vendored datasets
(every evaluation or calibration prompt is one of those), and the hard benign requests
also lose any twin of an everyday instruction, so the two sets can be split apart."""
from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

from vllm_safeinfer.data.readers import (
    Prompt,
    advbench,
    advbench_custom50,
    dangerousqa,
    hard_benign,
    harmbench,
    harmless_instructions,
    strongreject,
    xstest,
)
from vllm_safeinfer.data.twins import TwinIndex


def vendored_prompts() -> tuple[str, ...]:
    """Every prompt of the vendored datasets: the prompts of all the named sets
    (`registry.DATASETS`), each once, in the datasets' order."""
    texts = [row.goal for row in advbench()]
    for prompts in (advbench_custom50(), harmbench(), strongreject(), xstest("safe"),
                    xstest("unsafe"), dangerousqa()):
        texts.extend(p.text for p in prompts)
    return tuple(dict.fromkeys(texts))


def _without_twins(prompts: Sequence[Prompt], others: Iterable[str]) -> tuple[Prompt, ...]:
    index = TwinIndex((text, None) for text in others)
    return tuple(p for p in prompts if not index.twins_of(p.text))


@functools.lru_cache(maxsize=1)
def harmless_prompts() -> tuple[Prompt, ...]:
    """The project's harmless everyday instructions less any near twin of a vendored
    prompt (none is dropped today)."""
    return _without_twins(harmless_instructions(), vendored_prompts())


@functools.lru_cache(maxsize=1)
def hard_benign_prompts() -> tuple[Prompt, ...]:
    """The project's hard benign requests less any near twin of a vendored prompt or of
    an everyday instruction (none is dropped today)."""
    others = (*vendored_prompts(), *(p.text for p in harmless_instructions()))
    return _without_twins(hard_benign(), others)
