"""Sampling prompt sets for a run: a seeded sample that keeps every category's share,
and the identity of what was sampled, so a report names exactly the prompts it measured."""
from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Sequence

from vllm_safeinfer.data.readers import Prompt


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
