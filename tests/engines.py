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
    """A tiny model, its unsafe expert (tiny Llama: a smaller random twin, run as a model
    of its own; tiny Qwen2: its `ablate` expert, sharing the served weights, so its rows
    ride in the served model's forward), three unit safety vectors: `a` adds at layer 1 (a
    file without a residual norm, as written before it was recorded), `b` adds at layer 2
    (residual norm 2.0), `p` projects at layers 1 and 2 (target component 6) for the first
    4 positions of an answer, and a harm probe over layers 0 and 1 (`gating_probe`: random directions,
    which prompts it flags is arbitrary, what matters is that the engine and the reference
    agree)."""

    model: str
    expert: str
    vectors: dict[str, str]
    hidden_size: int
    probe: str
    expert_shares_weights: bool = False

    def safeinfer_config(self, **overrides) -> dict:
        config = {"vectors": self.vectors, "default_vector": "a", "expert_model": self.expert,
                  "probe": self.probe}
        if self.expert_shares_weights:
            config["expert_shares_weights"] = True
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
    for seed, (vector_name, layer, gamma, norm, steering, layers, window) in enumerate(
        (("a", 1, 1.0, None, "add", (), 0), ("b", 2, 1.5, 2.0, "add", (), 0),
         ("p", 1, 6.0, None, "project", (1, 2), 4))
    ):
        generator = torch.Generator().manual_seed(100 + seed)
        direction = torch.randn(config.hidden_size, generator=generator)
        file = folder / f"{name}-{vector_name}.safetensors"
        SafetyVector(
            vector=direction / direction.norm(), layer=layer, model=name,
            hidden_size=config.hidden_size, num_layers=config.num_hidden_layers,
            heads=((0, 0),), gamma=gamma, residual_norm=norm, steering=steering,
            layers=layers, answer_tokens=window,
        ).save(file)
        vectors[vector_name] = str(file)
    probe = folder / f"{name}-probe.safetensors"
    gating_probe(str(path), config).save(probe)
    if name in SHARED_EXPERT_MODELS:
        return TinyAssets(str(path), str(ablated_expert(name, folder)), vectors,
                          config.hidden_size, str(probe), expert_shares_weights=True)
    return TinyAssets(str(path), str(model_path(expert_of(name))), vectors, config.hidden_size,
                      str(probe))


SHARED_EXPERT_MODELS = ("tiny-qwen2",)


def ablated_expert(name: str, folder: Path) -> Path:
    """The `ablate` expert of a tiny model (direction found on a few default prompts)."""
    from vllm_safeinfer.offline.hf import load_model
    from vllm_safeinfer.offline.vector.refusal import (
        default_prompts,
        find_refusal_direction,
        save_ablated_expert,
    )

    out = folder / f"{name}-ablated"
    model, tokenizer = load_model(name)
    harmful, validation, harmless = default_prompts()
    found = find_refusal_direction(model, tokenizer, harmful[:16], harmless[:16],
                                   validation=validation[:4])
    save_ablated_expert(model, tokenizer, found, out, base_model=name)
    return out


# The tiny probe's chat markers: prompts built as `USER_HEADER + content + CONTENT_SUFFIX`
# are read over their content; raw prompts (the parity prompts) are read whole.
USER_HEADER, CONTENT_SUFFIX = (11, 12), (13, 14)
MONITOR_MIN_TOKENS = 2
# Answers long enough to see the monitor act (the stress tests' length).
LONG_TOKENS = 24


def templated(content: list[int], system: list[int] = ()) -> list[int]:
    """`content` as the tiny probe's chat template frames a user turn."""
    return [*system, *USER_HEADER, *content, *CONTENT_SUFFIX]


def _widest_split(values: list[float], sets: list[list[float]]) -> float:
    """A cut between two neighbouring `values` that splits every one of `sets` most evenly
    (ties: the widest gap, so that engine and reference agree despite rounding)."""
    ordered = sorted(values)

    def quality(i: int) -> tuple[int, float]:
        cut = (ordered[i] + ordered[i + 1]) / 2
        balance = min(min(sum(v > cut for v in set_), sum(v <= cut for v in set_))
                      for set_ in sets)
        return balance, ordered[i + 1] - ordered[i]

    best = max(range(len(ordered) - 1), key=quality)
    return (ordered[best] + ordered[best + 1]) / 2


def long_templated() -> list[list[int]]:
    """Long templated prompts behind a shared 70-token system prompt (two full blocks
    that a gated request may read from the prefix cache)."""
    from tests.parity import LONG_PROMPTS, long_prompt

    return [templated(p[start:start + 40], long_prompt(9, 70))
            for p in LONG_PROMPTS[:8] for start in (0, 40)]


def gating_probe(path: str, config) -> HarmProbe:
    """A probe over the content of layers 0 and 1 with random directions, its threshold
    splitting `tests.parity.PROMPTS`, `LONG_PROMPTS` (each read whole: no markers), the
    parity prompts templated and `long_templated()`, and an answer monitor whose
    threshold flags about half of the let-through parity prompts within `MAX_TOKENS`
    tokens and of the let-through long templated ones within `LONG_TOKENS` (the widest
    such gaps: engine and reference agree despite rounding)."""
    from tests.parity import LONG_PROMPTS, MAX_TOKENS, PROMPTS
    from vllm_safeinfer.offline.reference import RowSettings, SafeInferReference

    directions = torch.randn(2, config.hidden_size, generator=torch.Generator().manual_seed(7))
    probe = HarmProbe(directions=directions / directions.norm(dim=-1, keepdim=True),
                      layers=(0, 1), threshold=0.0, model="tiny",
                      hidden_size=config.hidden_size, num_layers=config.num_hidden_layers,
                      position="content-mean", user_header=USER_HEADER,
                      content_suffix=CONTENT_SUFFIX, monitor_min_tokens=MONITOR_MIN_TOKENS)
    reference = SafeInferReference.from_pretrained(path)
    groups = (PROMPTS, LONG_PROMPTS, [templated(p) for p in PROMPTS], long_templated())
    sets = [[s for _, s in reference.gate_verdicts(prompts, probe, 0.0)] for prompts in groups]
    probe = dataclasses.replace(probe, threshold=_widest_split(sum(sets, []), sets))
    peaks = []
    for prompts, scores, tokens in (([*groups[0], *groups[2]], sets[0] + sets[2], MAX_TOKENS),
                                    (groups[3], sets[3], LONG_TOKENS)):
        passed = [p for p, s in zip(prompts, scores) if s <= probe.threshold]
        answers = reference.generate(passed, RowSettings(), tokens, ignore_eos=True)
        peaks.append([_answer_peak(reference, probe, p, a) for p, a in zip(passed, answers)])
    return dataclasses.replace(probe, monitor_threshold=_widest_split(sum(peaks, []), peaks))


def _answer_peak(reference, probe: HarmProbe, prompt: list[int], answer: list[int]) -> float:
    """The highest running mean of the probe's scores over `answer`'s tokens that the
    monitor checks (the last token is sampled, never run)."""
    fed = answer[:-1]
    scores = _token_scores(reference, probe, prompt + fed)[len(prompt):]
    running = scores.cumsum(0) / torch.arange(1, len(fed) + 1)
    return float(running[MONITOR_MIN_TOKENS - 1:].max())


@torch.no_grad()
def _token_scores(reference, probe: HarmProbe, ids: list[int]) -> torch.Tensor:
    out = reference.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    states = torch.stack([out.hidden_states[layer + 1][0] for layer in probe.layers], dim=1)
    return probe.token_scores(states)


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
    """The eager engine of a tiny model with SafeInfer configured (vectors a, b, p; the
    expert; the probe; a `vector_dir`, so vectors can be published to it)."""
    published = str(Path(assets.probe).parent / "published")
    return engine_pool.get(
        f"eager:{assets.model}",
        lambda: new_llm(assets.model, additional_config={
            "safeinfer": assets.safeinfer_config(vector_dir=published)}),
    )


def new_llm(model: str, **kwargs):
    from vllm import LLM

    return LLM(model=model, **{**ENGINE_DEFAULTS, **kwargs})
