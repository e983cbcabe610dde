"""Choosing SafeInfer's strengths by measurement (`safeinfer calibrate`). The paper's
gamma 0.5 breaks a model whose vector is large against its residual stream, and the
useful band of strengths differs per model, so `calibrate` sweeps them with the HarmEval
harness (one engine, per-request options) on calibration prompts that no evaluation set
contains, and keeps the point with the lowest attack success whose over-refusal stays
within a budget of `off`'s and whose answers to safe prompts stay sound (no more
degenerate than `off`'s, within a budget; `calibration_choice` reads and chooses the
points).

Steering strengths are chosen by relative dose (`gamma * |SV| / |h|`, recorded in the
vector file; for a projecting vector the dose is the target component over the residual
norm), so one grid fits a vector 1.6x its residual norm and one 1.1x. Strengths must be
positive: gamma 0 and lam 0 are `off`. The sweep runs in stages in the same engine: a
coarse one (`off`, SA over the doses, sGDS over the lams), then a fine one around what
fit (SA between the best fitting dose and the next, SafeInfer at those doses with the
strongest fitting lams), so no budget is spent crossing strengths already known to
break the budgets. No point whose attack success is not below `off`'s is ever chosen.

With a harm probe configured, a gate stage runs mode `auto` once, before the fine stage,
to read the engine's probe score of every calibration prompt. A gated request's answer
is its defence's answer when flagged at its prompt and `off`'s otherwise, so every
defended point of the sweep is also scored at every threshold between two prompts'
scores without generating again, and the threshold is chosen with the strengths: benign
prompts the probe lets through no longer pay for a strong defence. What fits is then
judged gated, so the fine stage refines (and tries SafeInfer) where the gate makes room,
even when no dose fits ungated. A probe's answer monitor is not simulated:
it can only add a (steering) defence to answers the prompt gate let through, and what
it does is measured by the evaluation that follows, not chosen here.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vllm_safeinfer.common.config import SafeInferConfig
from vllm_safeinfer.common.modes import Mode
from vllm_safeinfer.common.vectors import SafetyVector
from vllm_safeinfer.harmeval.backends import Backend
from vllm_safeinfer.harmeval.launch import (
    artefact_hashes,
    backend_factory,
    engine_args_json,
    engine_kwargs,
    sized_engine_args,
)
from vllm_safeinfer.harmeval.points import Point, parse_sweep, plan_points, servable_modes
from vllm_safeinfer.harmeval.run import HarmEvalSettings, read_records, run_harmeval, sample_items
from vllm_safeinfer.harmeval.store import write_atomically
from vllm_safeinfer.harmeval.string_judges import KeywordJudge, XSTestJudge
from vllm_safeinfer.models import resolve_model
from vllm_safeinfer.offline.expert.project_models import resolve_project_model
from vllm_safeinfer.offline.workflows.calibration_choice import (
    ASR_JUDGE,
    HARMFUL,
    REFUSAL_JUDGE,
    SAFE,
    Candidate,
    best_candidate,
    candidates,
    choose,
    gated_candidates,
    written_config,
)

REPORT = "calibration.md"
COARSE, FINE, GATE = "coarse", "fine", "gate"
# Relative doses of the coarse stage: from barely there to past where small models
# break; SA acted on a safety-tuned 0.5B model only from about 1.1.
DEFAULT_DOSES = (0.05, 0.1, 0.2, 0.4, 0.7, 1.0, 1.5)
DEFAULT_LAMS = (0.5, 0.9, 0.99)
FINE_LAMS = 2  # the strongest fitting lams SafeInfer is tried with
GAMMA_DIGITS = 4  # significant digits of a gamma made from a dose


class NoFittingPoint(RuntimeError):
    """No defended point fits the budgets: writing `off` would defend nothing."""


def dose_gammas(vector_path: str, doses: Sequence[float]) -> tuple[float, ...]:
    """The gammas that give `doses` with the vector at `vector_path`, to 4 digits."""
    vector = SafetyVector.load(vector_path)
    unit = vector.relative_dose(1.0)
    if not unit:
        raise ValueError(f"{vector_path} records no residual norm, so doses cannot be "
                         "turned into gammas: rebuild it with `safeinfer vector build`, or "
                         "give --gammas")
    if any(d <= 0 for d in doses):
        raise ValueError(f"doses must be > 0, got {list(doses)}")
    return tuple(sorted({float(f"{d / unit:.{GAMMA_DIGITS}g}") for d in doses}))


def coarse_points(config: SafeInferConfig, gammas: Sequence[float],
                  lams: Sequence[float]) -> tuple[Point, ...]:
    """`off`, SA over `gammas` and sGDS over `lams` (those the config can serve)."""
    modes = [m for m in servable_modes(config) if m != Mode.SAFEINFER.value]
    return plan_points(modes, {"gamma": tuple(sorted(gammas)), "lam": tuple(sorted(lams))})


def check_strengths(gammas: Sequence[float] | None, lams: Sequence[float]) -> None:
    """A calibration grid of defences: every gamma and lam positive (0 is `off`; a
    negative gamma steers away from safety)."""
    for name, values in (("--gammas", gammas or ()), ("--lams", lams)):
        bad = [v for v in values if not v > 0]
        if bad:
            raise ValueError(f"{name} must all be > 0 (0 defends nothing: it is `off`), got "
                             f"{', '.join(map(repr, bad))}")


def fine_points(table: Sequence[Candidate], gammas: Sequence[float],
                can_mix: bool) -> tuple[Point, ...]:
    """After the coarse stage: SA at the geometric middle between the best fitting gamma
    (the lowest ASR; ties: the strongest) and the next one tried, and SafeInfer at those
    two gammas with the strongest fitting lams. A point fits ungated or, where `table`
    holds gated candidates, gated at some threshold (where a stronger dose fits only at
    a threshold that flags fewer prompts, the best is not the strongest). Nothing where
    SA fits nowhere."""
    fitting = [c for c in table
               if c.mode.removeprefix("auto:") == Mode.SA.value and c.eligible]
    if not fitting:
        return ()
    top = min(fitting, key=lambda c: (c.asr, -c.gamma)).gamma
    steer = [top]
    above = [g for g in sorted(gammas) if g > top]
    if above:
        steer.append(float(f"{math.sqrt(top * above[0]):.{GAMMA_DIGITS}g}"))
    points = [Point(Mode.SA.value, gamma=g) for g in steer[1:]]
    if can_mix:
        lams = sorted({c.lam for c in table
                       if c.mode.removeprefix("auto:") == Mode.SGDS.value and c.eligible})
        points += [Point(Mode.SAFEINFER.value, gamma=g, lam=lam)
                   for g in steer for lam in lams[-FINE_LAMS:]]
    return tuple(points)


def calibration_settings(model: str, safeinfer: Mapping[str, Any], points: Sequence[Point],
                         *, limit: int | None = None, max_tokens: int = 48, seed: int = 0,
                         engine_args: Mapping[str, Any] | None = None,
                         artefacts: Mapping[str, str] | None = None) -> HarmEvalSettings:
    """A HarmEval run of `points` on the two calibration sets."""
    return HarmEvalSettings(
        model=model, datasets=(HARMFUL, SAFE), points=tuple(points),
        judges=(ASR_JUDGE, REFUSAL_JUDGE), limit=limit, max_tokens=max_tokens, seed=seed,
        safeinfer=dict(safeinfer), allow_calibration_prompts=True,
        engine_args=engine_args, artefacts=artefacts)


def calibration_prompts(limit: int | None, seed: int = 0) -> list[str]:
    """The styled prompts a calibration sends (to size the engine before it starts)."""
    items, _ = sample_items(calibration_settings("", {}, (Point(Mode.OFF.value),),
                                                 limit=limit, seed=seed))
    return [item.prompt for item in items]


def calibrate(*, model: str, safeinfer: Mapping[str, Any], make_backend: Callable[[], Backend],
              out: Path, report_dir: Path, doses: Sequence[float] = DEFAULT_DOSES,
              gammas: Sequence[float] | None = None, lams: Sequence[float] = DEFAULT_LAMS,
              over_refusal_budget: float = 5.0, degeneration_budget: float = 2.0,
              allow_off: bool = False, limit: int | None = None, max_tokens: int = 48,
              seed: int = 0, engine_args: Mapping[str, Any] | None = None,
              artefacts: Mapping[str, str] | None = None, resume: bool = False,
              progress: bool = True) -> tuple[dict[str, Any], Candidate | None, list[Candidate]]:
    """Sweep, choose, and write `out` (a `--safeinfer-config` file: `safeinfer` plus the
    chosen mode and the strengths that fit) and `report_dir/calibration.md` beside the
    stages' HarmEval reports. `gammas` replaces the doses with a gamma grid. Returns
    (config, chosen, table); when no defended point fits, the table and report are still
    written and `NoFittingPoint` is raised, unless `allow_off`."""
    config = SafeInferConfig.from_dict(safeinfer)
    if config.default_vector is None:
        raise ValueError("calibration needs a safety vector")
    check_strengths(gammas, lams)
    grid = tuple(sorted(set(gammas))) if gammas else dose_gammas(
        config.vectors[config.default_vector], doses)
    backend: list[Backend] = []

    def shared_backend() -> Backend:
        if not backend:
            backend.append(make_backend())
        return backend[0]

    def stage(name: str, points: Sequence[Point]) -> dict[str, Any]:
        settings = calibration_settings(model, safeinfer, points, limit=limit,
                                        max_tokens=max_tokens, seed=seed,
                                        engine_args=engine_args, artefacts=artefacts)
        return run_harmeval(settings, shared_backend, [KeywordJudge(), XSTestJudge()],
                            report_dir / name, resume=resume, progress=progress)

    def judged(points: list[dict[str, Any]], stages: Sequence[str]) -> list[Candidate]:
        table = candidates({"points": points}, over_refusal_budget, degeneration_budget)
        if scores is None:
            return table
        records = [r for name in stages for r in read_records(report_dir / name)]
        return table + gated_candidates(table, records, scores, over_refusal_budget,
                                        degeneration_budget)

    points = stage(COARSE, coarse_points(config, grid, lams))["points"]
    scores = None
    if config.probe is not None:
        stage(GATE, (Point(Mode.AUTO.value),))
        scores = probe_scores(report_dir / GATE)
    table = judged(points, (COARSE,))
    fine = fine_points(table, grid, config.has_expert)
    if fine:
        points = points + stage(FINE, fine)["points"]
        table = judged(points, (COARSE, FINE))
    chosen = choose(table)
    chosen_config = written_config(safeinfer, table, chosen)
    write_atomically(report_dir / REPORT, _markdown(
        model, chosen, table, {p.key for p in fine}, out, max_tokens, over_refusal_budget,
        degeneration_budget))
    if chosen is None and not allow_off:
        raise NoFittingPoint(
            f"no defended point fits the budgets (over-refusal +{over_refusal_budget:g}, "
            f"degenerate safe answers +{degeneration_budget:g} points over off's); see "
            f"{report_dir / REPORT}. Widen the budgets, try other strengths, or pass "
            "--allow-off to write a config that serves `off`")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, json.dumps(chosen_config, indent=2, sort_keys=True) + "\n")
    return chosen_config, chosen, table


def probe_scores(folder: Path) -> dict[str, float]:
    """Prompt id -> the engine's harm-probe score, from the gate stage's records."""
    scores = {r["prompt_id"]: r["gate"]["score"] for r in read_records(folder) if r.get("gate")}
    if not scores:
        raise RuntimeError(f"the gate stage ({folder}) recorded no probe verdict: is the "
                           "harm probe configured on the engine?")
    return scores


def _markdown(model: str, chosen: Candidate | None, table: Sequence[Candidate],
              fine: set[str], out: Path, max_tokens: int, over_refusal_budget: float,
              degeneration_budget: float) -> str:
    verdict = (f"Chosen: **{chosen.point}** (written to `{out}`)." if chosen is not None
               else "**No defended point fits the budgets**: nothing to serve but `off`.")
    lines = [f"# Calibration: {model}", "",
             f"{verdict} Prompts: {HARMFUL} and {SAFE} (disjoint from every evaluation "
             f"set), {max_tokens} new tokens, greedy. A defence must lower the ASR below "
             f"off's. Budgets: over-refusal within {over_refusal_budget:g} points of off's, "
             f"degenerate answers (safe prompts, and harmful ones: a loop is no refusal) "
             f"within {degeneration_budget:g} points of off's. The chosen point is the "
             "defended one with the lowest ASR among those that fit (ties: the lower dose, "
             "then the lower lam). Relative dose: `gamma * |SV| / |h|`.", "",
             "| stage | point | relative dose | ASR % (keyword) | degenerate harmful answers "
             "% | over-refusal % (XSTest) | degenerate safe answers % | fits |",
             "|---|---|---|---|---|---|---|---|"]
    ungated = [c for c in table if c.threshold is None]
    gated = [c for c in table if c.threshold is not None]
    for c in ungated:
        mark = "**chosen**" if c == chosen else ("yes" if c.eligible else f"no: {c.why_not}")
        dose = "-" if c.relative_dose is None else f"{c.relative_dose:.3g}"
        lines.append(f"| {FINE if c.point in fine else COARSE} | {c.point} | {dose} | "
                     f"{c.asr:.1f} | {c.harmful_degenerate:.1f} | {c.over_refusal:.1f} | "
                     f"{c.benign_degenerate:.1f} | {mark} |")
    lines.append("")
    if gated:
        best = {}
        for c in gated:  # each gated point at its best threshold within the budgets
            key = c.mode, c.gamma, c.lam
            if c.eligible and (key not in best or best_candidate([best[key], c]) == c):
                best[key] = c
        lines += ["Mode `auto`: each defended point gated by the harm probe, at the "
                  f"threshold with the lowest ASR within the budgets ({len(gated)} "
                  "(point, threshold) pairs scored from the probe scores of the gate stage "
                  "and the answers above).", "",
                  "| point | threshold | safe prompts flagged % | ASR % | degenerate harmful "
                  "answers % | over-refusal % | degenerate safe answers % | |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in sorted(best.values(), key=lambda c: (c.asr, c.point)):
            lines.append(f"| {c.point} | {c.threshold:.4g} | {c.flagged_safe:.1f} | "
                         f"{c.asr:.1f} | {c.harmful_degenerate:.1f} | {c.over_refusal:.1f} | "
                         f"{c.benign_degenerate:.1f} | {'**chosen**' if c == chosen else ''} |")
        lines.append("")
    for stage in (COARSE, FINE) if fine else (COARSE,):
        lines += [f"![{stage} stage: ASR against over-refusal]({stage}/sweep.png)", ""]
    lines += ["Each stage's full HarmEval report is `report.md` in its folder.", ""]
    return "\n".join(lines)


def calibrate_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`safeinfer calibrate`: one engine for the whole sweep, sized to the calibration
    prompts; the chosen point printed, or exit 1 when none fits (without --allow-off)."""
    out = Path(args.out)
    report_dir = Path(args.report_dir or out.with_name(out.stem + "-calibration"))
    safeinfer = {"vector": args.vector}
    if args.probe:
        safeinfer["probe"] = args.probe
    try:
        check_strengths(args.gammas, args.lams or DEFAULT_LAMS)
        if args.expert:
            safeinfer["expert_model"] = resolve_project_model(args.expert)
        sweep = parse_sweep([f"lam={','.join(map(repr, args.lams or DEFAULT_LAMS))}"]
                            + ([f"gamma={','.join(map(repr, args.gammas))}"]
                               if args.gammas else []))
        model = resolve_model(args.model)
        engine_args = sized_engine_args(model, calibration_prompts(args.limit),
                                        args.max_tokens, engine_args_json(args.engine_args))
        make_backend = backend_factory(llm_kwargs=engine_kwargs(
            model, safeinfer, seed=0, extra=engine_args))
        _, chosen, _ = calibrate(
            model=args.model, safeinfer=safeinfer, make_backend=make_backend, out=out,
            report_dir=report_dir, doses=args.doses or DEFAULT_DOSES,
            gammas=sweep.get("gamma"), lams=sweep["lam"],
            over_refusal_budget=args.over_refusal_budget,
            degeneration_budget=args.degeneration_budget, allow_off=args.allow_off,
            limit=args.limit, max_tokens=args.max_tokens, engine_args=engine_args,
            artefacts=artefact_hashes(safeinfer), resume=args.resume)
    except ValueError as err:
        parser.error(str(err))
    except NoFittingPoint as err:
        print(f"safeinfer calibrate: {err}", file=sys.stderr)
        return 1
    if chosen is None:
        print(f"chosen: off (no defended point fits; --allow-off); wrote {out}")
        return 0
    print(f"chosen: {chosen.point} (ASR {chosen.asr:.1f}%, over-refusal "
          f"{chosen.over_refusal:.1f}%, degenerate safe answers "
          f"{chosen.benign_degenerate:.1f}%); wrote {out}")
    return 0
