"""Test support: the same SafeInfer request expressed for vLLM (extra_args) and for the HF
reference (RowSettings), and generation helpers for both."""
from __future__ import annotations

from dataclasses import dataclass

from vllm_safeinfer.common.config import DEFAULT_LAM
from vllm_safeinfer.common.modes import Mode
from vllm_safeinfer.offline.reference import RowSettings

PROMPTS: list[list[int]] = [
    [5, 77, 120, 33, 250, 18, 9],
    [300, 12],
    [44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56],
    [199],
    [7, 8, 9, 10, 400, 401, 402, 403, 90],
]
MAX_TOKENS = 10


def long_prompt(seed: int, length: int) -> list[int]:
    return [(seed * 7919 + i * 104729) % 480 + 10 for i in range(length)]


# Prompts longer than the stress engine's 64-token step: their last chunk is a split one.
LONG_PROMPTS: list[list[int]] = [long_prompt(200 + i, 120 + 11 * i) for i in range(16)]


@dataclass(frozen=True)
class Case:
    """One request's SafeInfer options."""

    mode: str = "off"
    vector: str | None = None
    gamma: float | None = None
    lam: float | None = None
    defence: str | None = None  # mode auto: what a flagged request runs

    def extra_args(self) -> dict | None:
        args = {"safeinfer_mode": self.mode}
        for key, value in (("safeinfer_vector", self.vector), ("safeinfer_gamma", self.gamma),
                           ("safeinfer_lam", self.lam), ("safeinfer_defence", self.defence)):
            if value is not None:
                args[key] = value
        return args

    def row_settings(self, assets) -> RowSettings:
        """The reference's settings; a gated case runs its defence (the tiny engines'
        default defence is safeinfer) when the probe flags it."""
        gated = self.mode == "auto"
        mode = Mode(self.defence or "safeinfer") if gated else Mode(self.mode)
        lam = self.lam if self.lam is not None else DEFAULT_LAM
        if not mode.steers:
            return RowSettings(mode, lam=lam, gated=gated)
        return RowSettings.steering_with(mode, assets.vector(self.vector or "a"), self.gamma,
                                         lam=lam, gated=gated)


MIXED_CASES = [
    Case("off"),
    Case("sa"),
    Case("sa", gamma=-2.0),
    Case("sa", vector="b"),
    Case("sgds"),
    Case("sgds", lam=0.5),
    Case("safeinfer", vector="b", lam=0.9),
    Case("sa", vector="p"),
    Case("safeinfer", vector="p", gamma=-4.0, lam=0.5),
]


def sampling(case: Case | None = None, max_tokens: int = MAX_TOKENS, **kwargs):
    from vllm import SamplingParams

    extra = case.extra_args() if case is not None else None
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, extra_args=extra, **kwargs)


def vllm_generate(llm, prompts: list[list[int]], params) -> list[list[int]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def reference_generate(reference, assets, prompts, cases, max_tokens: int = MAX_TOKENS,
                       **kwargs):
    return reference.generate(prompts, [c.row_settings(assets) for c in cases], max_tokens,
                              probe=assets.harm_probe(), **kwargs)
