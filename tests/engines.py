"""Test support: vLLM engines shared by the whole session, keyed by configuration, and
the tiny models' SafeInfer assets. Engines take 25-60 s to start on 2 cores, so every
test asks the pool, and at most two stay alive (the least recently used is shut down)."""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_safeinfer.common.probe import HarmProbe
from vllm_safeinfer.common.vectors import SafetyVector
from vllm_safeinfer.models import expert_of, model_path

MAX_ALIVE = 2
# Every tiny engine of the suite: fp32 and eager so that outputs match the HF reference.
ENGINE_DEFAULTS = dict(dtype="float32", max_model_len=512, block_size=32, enforce_eager=True,
                       seed=0, max_num_seqs=16)


@dataclass(frozen=True)
class TinyAssets:
    """A tiny model, its expert twin, two unit safety vectors: `a` at layer 1 (a file
    without a residual norm, as written before it was recorded) and `b` at layer 2 (residual
    norm 2.0), and a harm probe at layer 1 whose threshold splits both `tests.parity.PROMPTS`
    and `LONG_PROMPTS` (a random direction: which prompts it flags is arbitrary, what
    matters is that the engine and the reference agree)."""

    model: str
    expert: str
    vectors: dict[str, str]
    hidden_size: int
    probe: str

    def safeinfer_config(self, **overrides) -> dict:
        config = {"vectors": self.vectors, "default_vector": "a", "expert_model": self.expert,
                  "probe": self.probe}
        config.update(overrides)
        return config

    def vector(self, name: str) -> SafetyVector:
        return SafetyVector.load(self.vectors[name])

    def harm_probe(self) -> HarmProbe:
        return HarmProbe.load(self.probe)


def make_tiny_assets(name: str, folder: Path) -> TinyAssets:
    from transformers import AutoConfig

    path = model_path(name)
    config = AutoConfig.from_pretrained(path)
    vectors = {}
    for seed, (vector_name, layer, gamma, norm) in enumerate(
        (("a", 1, 1.0, None), ("b", 2, 1.5, 2.0))
    ):
        generator = torch.Generator().manual_seed(100 + seed)
        direction = torch.randn(config.hidden_size, generator=generator)
        file = folder / f"{name}-{vector_name}.safetensors"
        SafetyVector(
            vector=direction / direction.norm(), layer=layer, model=name,
            hidden_size=config.hidden_size, num_layers=config.num_hidden_layers,
            heads=((0, 0),), gamma=gamma, residual_norm=norm,
        ).save(file)
        vectors[vector_name] = str(file)
    probe = folder / f"{name}-probe.safetensors"
    splitting_probe(str(path), config).save(probe)
    return TinyAssets(str(path), str(model_path(expert_of(name))), vectors, config.hidden_size,
                      str(probe))


def splitting_probe(path: str, config) -> HarmProbe:
    """A probe at layer 1 with a random direction, its threshold between two neighbouring
    scores of `PROMPTS` and `LONG_PROMPTS` where it flags as many of each set as it lets
    through (the widest such gap: engine and reference agree despite rounding)."""
    from tests.parity import LONG_PROMPTS, PROMPTS
    from vllm_safeinfer.offline.reference import SafeInferReference

    direction = torch.randn(config.hidden_size, generator=torch.Generator().manual_seed(7))
    probe = HarmProbe(direction=direction / direction.norm(), layer=1, threshold=0.0,
                      model="tiny", hidden_size=config.hidden_size,
                      num_layers=config.num_hidden_layers)
    reference = SafeInferReference.from_pretrained(path)
    sets = [[s for _, s in reference.gate_verdicts(prompts, probe, 0.0)]
            for prompts in (PROMPTS, LONG_PROMPTS)]
    scores = sorted(s for scores in sets for s in scores)

    def quality(i: int) -> tuple[int, float]:
        cut = (scores[i] + scores[i + 1]) / 2
        balance = min(min(sum(s > cut for s in set_), sum(s <= cut for s in set_))
                      for set_ in sets)
        return balance, scores[i + 1] - scores[i]

    best = max(range(len(scores) - 1), key=quality)
    return dataclasses.replace(probe, threshold=(scores[best] + scores[best + 1]) / 2)


class EnginePool:
    def __init__(self) -> None:
        self._engines: OrderedDict[str, object] = OrderedDict()

    def get(self, key: str, build: Callable[[], object]):
        if key in self._engines:
            self._engines.move_to_end(key)
            return self._engines[key]
        while len(self._engines) >= MAX_ALIVE:
            _, old = self._engines.popitem(last=False)
            shutdown(old)
        engine = build()
        self._engines[key] = engine
        return engine

    def close(self) -> None:
        while self._engines:
            shutdown(self._engines.popitem()[1])


def shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()


def safeinfer_engine(engine_pool: EnginePool, assets: TinyAssets):
    """The eager engine of a tiny model with SafeInfer configured (vectors a, b; expert)."""
    return engine_pool.get(
        f"eager:{assets.model}",
        lambda: new_llm(assets.model, additional_config={"safeinfer": assets.safeinfer_config()}),
    )


def new_llm(model: str, **kwargs):
    from vllm import LLM

    return LLM(model=model, **{**ENGINE_DEFAULTS, **kwargs})
