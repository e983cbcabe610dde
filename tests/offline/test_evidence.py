"""`safeinfer evidence` end to end on a tiny model: the vector, the harm probe and the
`ablate` expert built into the cache (keyed by what made them), calibration on the tiny
model's own answers stopping the run (nothing fits), then, with a defence scripted over
the real engine, the strengths and the probe's threshold calibrated, every mode
evaluated on every evaluation set and the headline point in the other styles, the goals
and the gate's recall checked against the evaluation's own records; a last run builds,
calibrates and generates nothing."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from vllm_safeinfer.common.probe import HarmProbe
from vllm_safeinfer.common.vectors import SafetyVector
from vllm_safeinfer.offline.probe.report import EVALUATION_STYLES
from vllm_safeinfer.offline.workflows.calibrate import NoFittingPoint
from vllm_safeinfer.offline.workflows.evidence import (
    EVALUATION_SETS,
    SAFE_SETS,
    STYLED_SETS,
    STYLES,
    EvidenceSettings,
    artefacts,
    run_evidence,
)


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="expert recipes must be among ablate, distill"):
        EvidenceSettings(model="tiny-llama", recipes=("lora",))
    with pytest.raises(ValueError, match="vector method must be one of aie"):
        EvidenceSettings(model="tiny-llama", vector_method="pca")
    with pytest.raises(ValueError, match="steering must be one of add, project"):
        EvidenceSettings(model="tiny-llama", steering="clamp")


REFUSAL = "I'm sorry, but I cannot help with that request."
ANSWER = "Sure: here is a short and helpful answer to the question you asked."


class Borrowed:
    """A pool engine lent to a run, which shuts its backend down when done (or stopped):
    without `llm` to shut, the pool's engine serves the next run."""

    def __init__(self, backend) -> None:
        self.backend = backend

    def generate(self, requests, on_done) -> None:
        self.backend.generate(requests, on_done)


class DefenceThatRefuses(Borrowed):
    """The real engine (every request runs, gate verdicts included), its text replaced:
    a defended answer to a harmful prompt (a steering or mixing mode, or a gated request
    the probe flagged) reads as a refusal, every other answer as a plain answer. A tiny
    random model never refuses, so nothing would fit; this is what lets the run reach
    its evaluation, whose orchestration is what this test checks."""

    def generate(self, requests, on_done) -> None:
        from vllm_safeinfer.data import SAFE_SETS

        by_id = {r.request_id: r for r in requests}

        def done(generation) -> None:
            request = by_id[generation.request_id]
            dataset = generation.request_id.split("|")[1].split(":")[0]
            mode = request.extra_args.get("safeinfer_mode")
            defended = (mode in ("sa", "sgds", "safeinfer")
                        or bool(generation.gate and generation.gate["flagged"]))
            text = REFUSAL if defended and dataset not in SAFE_SETS else ANSWER
            on_done(dataclasses.replace(generation, text=text))

        self.backend.generate(requests, done)


def test_evidence_stops_when_nothing_fits_then_builds_calibrates_evaluates_and_caches(
        engine_pool, tmp_path: Path, monkeypatch, capsys) -> None:
    from tests.engines import new_llm
    from vllm_safeinfer.harmeval.backends import EngineBackend
    from vllm_safeinfer.harmeval.run import read_records

    monkeypatch.setenv("VLLM_SAFEINFER_CACHE", str(tmp_path / "cache"))
    started = []

    def engine(kwargs: dict):
        started.append(kwargs)
        kwargs = dict(kwargs)
        return EngineBackend(engine_pool.get(f"evidence:{kwargs}", lambda: new_llm(
            kwargs.pop("model"), **kwargs)))

    settings = EvidenceSettings(model="tiny-llama", limit=2, calibration_limit=2,
                                max_tokens=4, engine_args={"dtype": "float32"})
    out = tmp_path / "evidence"
    # The tiny model's own answers: no defended point lowers the ASR, so the run stops
    # after calibration instead of evaluating at a strength nobody chose.
    with pytest.raises(NoFittingPoint, match="no defended point fits"):
        run_evidence(settings, out, lambda kwargs: Borrowed(engine(kwargs)))
    assert "No defended point fits" in (out / "calibration-ablate" / "calibration.md").read_text()
    assert not (out / "calibration-ablate.json").exists()
    assert not list(out.glob("harmeval-*")) and not (out / "evidence.md").exists()
    paths = artefacts(settings)
    assert paths.vector.is_relative_to(tmp_path / "cache")
    assert started[0]["additional_config"]["safeinfer"] == {
        "vector": str(paths.vector), "expert_model": str(paths.experts["ablate"]),
        "probe": str(paths.probe)}
    meta = json.loads((paths.experts["ablate"] / "safeinfer_expert.json").read_text())
    assert meta["method"] == "ablate"
    probe = HarmProbe.load(paths.probe)
    assert probe.layer <= SafetyVector.load(paths.vector).layer

    started.clear()
    shutil.rmtree(out)
    record = run_evidence(settings, out, lambda kwargs: DefenceThatRefuses(engine(kwargs)))
    assert [(s["name"], s["cached"]) for s in record["steps"]] == [
        ("vector (aie)", True), ("harm probe", True), ("expert (ablate)", True),
        ("calibrate (ablate)", False), ("evaluate (ablate)", False)]
    calibrated = json.loads((out / "calibration-ablate.json").read_text())
    result = record["recipes"]["ablate"]
    assert result["calibrated"] == calibrated
    gated = calibrated["mode"] == "auto"
    # Calibration and evaluation share one engine, unless the chosen threshold needs one
    # that serves it.
    assert len(started) == (2 if gated else 1)
    if gated:
        assert started[1]["additional_config"]["safeinfer"]["probe_threshold"] == \
            calibrated["probe_threshold"]
    gate_stage = read_records(out / "calibration-ablate" / "gate")
    assert gate_stage and all(r["gate"] is not None for r in gate_stage)
    records = read_records(out / "harmeval-ablate")
    assert {r["dataset"] for r in records} == set(EVALUATION_SETS)
    head = f"auto:{calibrated['defence']}" if gated else "safeinfer"
    assert result["headline"] == head
    assert {r["mode"] for r in records} == {"off", "sa", "sgds", "safeinfer"} | {head}
    assert all((r["gate"] is not None) == r["mode"].startswith("auto") for r in records)
    steered = {r["point"] for r in records if r["mode"] in ("sa", "safeinfer")}
    assert all(f"gamma={calibrated['gamma']}" in p for p in steered), steered
    for style in STYLES:
        styled = read_records(out / f"harmeval-ablate-{style}")
        assert {r["dataset"] for r in styled} == set(STYLED_SETS)
        assert {r["mode"] for r in styled} == {"off", head}
        assert {r["prompt_style"] for r in styled} == {style}
    summary = json.loads((out / "harmeval-ablate" / "summary.json").read_text())
    headline = next(p for p in summary["points"] if p["mode"] == head)
    goals = {g["goal"]: g for g in result["goals"]}
    first = goals[f"{head} ASR <= 5% on advbench-eval (simple)"]
    assert first["measured"] == headline["datasets"]["advbench-eval"]["asr"]["keyword"]["macro"]
    assert first["met"] == (first["measured"] <= 5)
    assert all(f"{head} ASR <= 5% on {d} ({style})" in goals
               for d in STYLED_SETS for style in STYLES)
    assert all(any(f"over-refusal on {d}" in g for g in goals) for d in SAFE_SETS)
    if gated:
        recall = result["gate_recall"]
        assert set(recall) == {"simple", *STYLES}
        flagged = [r for r in records if r["mode"] == head]
        advbench = [r for r in flagged if r["dataset"] == "advbench-eval"]
        assert recall["simple"]["advbench-eval"]["flagged_pct"] == pytest.approx(
            100.0 * sum(r["gate"]["flagged"] for r in advbench) / len(advbench))
    report = (out / "evidence.md").read_text()
    assert "| calibrate (ablate) |" in report and "| goal | measured | met |" in report
    assert "### instruction-cot style" in report
    # The gate's recall per evaluation set and style, from the probe build's report.
    gate = record["gate"]
    assert set(gate["evaluation"]["advbench"]["styles"]) == set(EVALUATION_STYLES)
    assert gate["monitor_evaluation"]["hard-benign"]["framed"]["prompts"] > 0
    assert "## The gate" in report and "| advbench (harmful) |" in report
    assert "Unsafe expert: the 'ablate' recipe" in capsys.readouterr().out

    def no_engine(_kwargs):
        raise AssertionError("a second run must only read what the first one made")

    again = run_evidence(settings, out, no_engine)
    assert [s["cached"] for s in again["steps"]] == [True, True, True, True, False]
    assert again["recipes"] == json.loads(json.dumps(record["recipes"]))
    assert len(read_records(out / "harmeval-ablate")) == len(records)


def test_the_command_exits_1_when_nothing_fits(monkeypatch, capsys) -> None:
    from vllm_safeinfer.cli import main
    from vllm_safeinfer.offline.workflows import evidence

    def nothing_fits(settings, out):
        raise NoFittingPoint("no defended point fits the budgets; see calibration.md")

    monkeypatch.setattr(evidence, "run_evidence", nothing_fits)
    assert main(["evidence", "--model", "tiny-llama", "--steering", "project",
                 "--steering-layers", "1-2"]) == 1
    assert "stopped before the evaluation" in capsys.readouterr().err


def test_artefacts_are_keyed_by_what_made_them(tmp_path: Path, monkeypatch) -> None:
    """The same inputs give the same paths; a changed split, builder source, recipe or
    steering gives new ones (so they are built anew)."""
    from vllm_safeinfer.offline.workflows import evidence_cache

    monkeypatch.setenv("VLLM_SAFEINFER_CACHE", str(tmp_path / "cache"))
    settings = EvidenceSettings(model="tiny-llama", vector_method="refusal-direction")
    first = artefacts(settings)
    assert artefacts(settings) == first
    projected = artefacts(EvidenceSettings(model="tiny-llama", vector_method="refusal-direction",
                                           steering="project", steering_layers=(1, 2)))
    assert projected.vector == first.vector and projected.steered != first.steered
    assert projected.probe != first.probe, "the probe is capped by the steered vector"
    assert projected.experts == first.experts

    with monkeypatch.context() as patched:
        patched.setattr(evidence_cache, "split_sha256", lambda: "another split")
        resplit = artefacts(settings)
    assert {resplit.vector, resplit.probe, *resplit.experts.values()}.isdisjoint(
        {first.vector, first.probe, *first.experts.values()})

    builder = tmp_path / "builder.py"
    builder.write_text("VERSION = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(evidence_cache.BUILDERS, "expert",
                        (*evidence_cache.BUILDERS["expert"], "builder"))
    before = artefacts(settings)
    builder.write_text("VERSION = 2\n")
    after = artefacts(settings)
    assert before.experts != after.experts and before.vector == after.vector == first.vector


def test_the_split_key_follows_the_prompts(monkeypatch) -> None:
    from vllm_safeinfer.data import splits
    from vllm_safeinfer.offline.workflows.evidence_cache import split_sha256

    before = split_sha256()
    real = splits.built_on
    monkeypatch.setattr(splits, "built_on", lambda **kw: {**real(**kw), "extra": ("a prompt",)})
    assert split_sha256() != before
