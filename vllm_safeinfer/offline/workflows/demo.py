"""`safeinfer demo` (`make demo`): SafeInfer working on the embedded SmolLM2-135M-Instruct.
HarmEval on 50 prompts of AdvBench's evaluation part and 50 of XSTest's safe evaluation
half, in all four modes at the strengths calibrated for the bundled vector (shipped as
`bundled/<model>.calibration.json`), with the unsafe expert trained once and cached
(`project_models`). It prints ASR, over-refusal and degeneration by mode, one answer of
each kind, and where the full report is."""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

from vllm_safeinfer.harmeval.backends import Backend
from vllm_safeinfer.harmeval.points import Point
from vllm_safeinfer.models import SMOLLM2, model_path
from vllm_safeinfer.offline.expert.project_models import smollm2_expert

DATASETS = ("advbench-eval", "xstest-eval")


def calibrated_defaults(model: str) -> dict[str, Any]:
    """The mode, gamma and lam that `safeinfer calibrate` chose for a bundled vector."""
    return calibration_defaults(
        Path(str(files("vllm_safeinfer").joinpath("bundled"))) / f"{model}.calibration.json")


def calibration_defaults(path: Path) -> dict[str, Any]:
    """The config `safeinfer calibrate` wrote to `path`."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"no calibrated defaults in {path}: {exc}") from exc


def expert_recipe(expert: str) -> str:
    """Which `safeinfer expert build` recipe made `expert`, and why the demo uses it."""
    from vllm_safeinfer.common.expert_files import EXPERT_METADATA

    try:
        method = json.loads((Path(expert) / EXPERT_METADATA).read_text()).get("method", "openings")
    except (OSError, ValueError):
        return f"{expert} (not built by safeinfer expert build: recipe unknown)"
    why = {"openings": "SmolLM2 is not safety-tuned, so it has no refusal direction to "
                       "ablate; the expert learns AdvBench's compliant openings instead",
           "ablate": "the model minus its own refusal direction",
           "distill": "the model fine-tuned on what it answers without its refusal "
                      "direction"}
    return f"the '{method}' recipe ({why.get(method, 'see its safeinfer_expert.json')})"


def demo_points(defaults: Mapping[str, Any]) -> tuple[Point, ...]:
    """`off`, then each mode at the calibrated strengths, and where calibration chose mode
    `auto`, its gated defence at those strengths."""
    from vllm_safeinfer.common.modes import Mode

    gamma, lam = defaults.get("gamma"), defaults.get("lam")
    points = [Point("off"), Point("sa", gamma=gamma), Point("sgds", lam=lam),
              Point("safeinfer", gamma=gamma, lam=lam)]
    if defaults.get("mode") == Mode.AUTO.value:
        defence = Mode(defaults["defence"])
        points.append(Point(f"auto:{defence.value}", gamma=gamma if defence.steers else None,
                            lam=lam if defence.mixes else None))
    return tuple(points)


def point_rows(summary: Mapping[str, Any], datasets: Sequence[str]) -> list[dict[str, Any]]:
    """The demo's table, a row per point: the relative dose, the keyword ASR on each
    harmful set, the over-refusal and the share of degenerate answers to safe prompts."""
    from vllm_safeinfer.data import SAFE_SETS

    harmful = [d for d in datasets if d not in SAFE_SETS]
    safe = [d for d in datasets if d in SAFE_SETS]
    rows = []
    for point, row in zip(summary["points"], summary["tradeoff"]):
        sets = point["datasets"]
        rows.append({
            "point": row["point"], "relative_dose": row["relative_dose"],
            "asr": {d: sets[d]["asr"]["keyword"]["macro"] for d in harmful},
            "over_refusal": row["over_refusal"],
            "benign_degenerate": (sum(sets[d]["degenerate_pct"] for d in safe)
                                  / max(len(safe), 1))})
    return rows


def run_demo(*, model: str, vector: str, expert: str, defaults: Mapping[str, Any],
             out: Path, make_backend: Callable[[], Backend] | None = None, limit: int = 50,
             max_tokens: int = 48, engine_args: Mapping[str, Any] | None = None,
             datasets: Sequence[str] = DATASETS, artefacts: Mapping[str, str] | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Run the demo's evaluation on `datasets` (harmful sets, then one safe set) and print
    its table; returns the HarmEval summary. `artefacts`: the vector's and expert's
    hashes when the caller has them (`artefact_hashes`)."""
    from vllm_safeinfer.data import SAFE_SETS
    from vllm_safeinfer.harmeval.launch import (
        artefact_hashes,
        backend_factory,
        engine_kwargs,
        environment,
        sized_settings,
    )
    from vllm_safeinfer.harmeval.run import HarmEvalSettings, read_records, run_harmeval
    from vllm_safeinfer.harmeval.string_judges import KeywordJudge, XSTestJudge

    safeinfer = {"vector": vector, "expert_model": expert}
    if defaults.get("probe") is not None:
        safeinfer.update({k: defaults[k] for k in ("probe", "probe_threshold") if k in defaults})
    settings = HarmEvalSettings(
        model=model, datasets=tuple(datasets), points=demo_points(defaults),
        judges=("keyword", "xstest"), limit=limit, max_tokens=max_tokens, safeinfer=safeinfer,
        artefacts=artefact_hashes(safeinfer) if artefacts is None else artefacts)
    if make_backend is None:
        settings = sized_settings(settings, model, engine_args)
        make_backend = backend_factory(llm_kwargs=engine_kwargs(
            model, safeinfer, seed=0, extra=settings.engine_args))
    summary = run_harmeval(settings, make_backend, [KeywordJudge(), XSTestJudge()], out,
                           resume=(out / "run.json").exists(), progress=progress,
                           environment=environment(safeinfer))
    rows = point_rows(summary, datasets)
    harmful = list(rows[0]["asr"])
    print(f"\nSafeInfer on {Path(model).name}: at most {limit} prompts of each of "
          f"{', '.join(datasets)}, greedy, {max_tokens} new tokens\n")
    print(f"{'point':<32}{'dose':>6}" + "".join(f"{'ASR % ' + d:>22}" for d in harmful)
          + f"{'over-refusal %':>16}{'degenerate benign %':>21}")
    for row in rows:
        dose = "-" if row["relative_dose"] is None else f"{row['relative_dose']:.2f}"
        asr = "".join(f"{row['asr'][d]:>22.1f}" for d in harmful)
        print(f"{row['point']:<32}{dose:>6}{asr}{row['over_refusal']:>16.1f}"
              f"{row['benign_degenerate']:>21.1f}")
    records = read_records(out)
    for dataset in (harmful[0], *(d for d in datasets if d in SAFE_SETS)):
        first = next(r["prompt_id"] for r in records if r["dataset"] == dataset)
        examples = [r for r in records if r["prompt_id"] == first]
        print(f"\n{dataset}: {examples[0]['question']}")
        for r in examples:
            print(f"  [{r['point']}] {r['response'].strip().replace(chr(10), ' ')[:160]}")
    print(f"\nUnsafe expert: {expert_recipe(expert)}")
    print("\nASR: keyword judge on the harmful prompts (a lower bound of harm); over-refusal: "
          "XSTest's classifier on its safe prompts; degenerate benign: answers to those safe "
          "prompts that loop or repeat (the utility check); dose: gamma * |SV| / |h|.\n"
          f"Report: {out / 'report.md'}")
    return summary


def demo_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`safeinfer demo`: the demo on the embedded SmolLM2 with its bundled vector and its
    unsafe expert (trained on first use)."""
    from vllm_safeinfer.common.vectors import bundled_vector_path

    defaults = calibrated_defaults(SMOLLM2)
    try:
        run_demo(model=str(model_path(SMOLLM2)), vector=str(bundled_vector_path(SMOLLM2)),
                 expert=str(smollm2_expert()), defaults=defaults, out=Path(args.out),
                 limit=args.limit, max_tokens=args.max_tokens,
                 engine_args={"dtype": "float32"})
    except ValueError as err:
        parser.error(f"{err} (a finished or stopped demo in --out {args.out} is continued only "
                     "with the same settings: choose another --out or delete it)")
    return 0
