"""`safeinfer evidence` end to end on a tiny model: the vector and the `ablate` expert are
built into the cache with a harm probe, the strengths and the probe's threshold
calibrated, every mode evaluated on the three evaluation sets at the chosen point with
one engine, and the goals checked against the
evaluation's own numbers; a second run builds, calibrates and generates nothing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_safeinfer.common.probe import HarmProbe
from vllm_safeinfer.offline.probe_report import EVALUATION_STYLES
from vllm_safeinfer.common.vectors import SafetyVector
from vllm_safeinfer.offline.evidence import (
    EVALUATION_SETS,
    EvidenceSettings,
    artefact_dir,
    run_evidence,
)


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="expert recipes must be among ablate, distill"):
        EvidenceSettings(model="tiny-llama", recipes=("lora",))
    with pytest.raises(ValueError, match="vector method must be one of aie"):
        EvidenceSettings(model="tiny-llama", vector_method="pca")


def test_evidence_builds_calibrates_evaluates_and_caches(engine_pool, tmp_path: Path,
                                                         monkeypatch, capsys) -> None:
    from tests.engines import new_llm
    from vllm_safeinfer.harmeval.backends import EngineBackend
    from vllm_safeinfer.harmeval.run import read_records

    monkeypatch.setenv("VLLM_SAFEINFER_CACHE", str(tmp_path / "cache"))
    started = []

    def make_backend(kwargs: dict):
        started.append(kwargs)
        kwargs = dict(kwargs)
        return EngineBackend(engine_pool.get(f"evidence:{kwargs}", lambda: new_llm(
            kwargs.pop("model"), **kwargs)))

    settings = EvidenceSettings(model="tiny-llama", limit=2, calibration_limit=2,
                                max_tokens=4, engine_args={"dtype": "float32"})
    out = tmp_path / "evidence"
    record = run_evidence(settings, out, make_backend)
    assert len(started) == 1, "calibration and evaluation share one engine"
    cache = artefact_dir("tiny-llama")
    assert cache.is_relative_to(tmp_path / "cache")
    assert started[0]["additional_config"]["safeinfer"] == {
        "vector": str(cache / "vector-aie.safetensors"),
        "expert_model": str(cache / "expert-ablate"),
        "probe": str(cache / "probe-aie.safetensors")}
    meta = json.loads((cache / "expert-ablate" / "safeinfer_expert.json").read_text())
    assert meta["method"] == "ablate"
    assert [s["name"] for s in record["steps"]] == [
        "vector (aie)", "harm probe", "expert (ablate)", "calibrate (ablate)",
        "evaluate (ablate)"]
    assert not any(s["cached"] for s in record["steps"])
    probe = HarmProbe.load(cache / "probe-aie.safetensors")
    assert probe.layer <= SafetyVector.load(cache / "vector-aie.safetensors").layer

    calibrated = json.loads((out / "calibration-ablate.json").read_text())
    result = record["recipes"]["ablate"]
    assert result["calibrated"] == calibrated
    # Calibration read the engine's probe score of every calibration prompt.
    gate_stage = read_records(out / "calibration-ablate" / "gate")
    assert gate_stage and all(r["gate"] is not None for r in gate_stage)
    records = read_records(out / "harmeval-ablate")
    assert {r["dataset"] for r in records} == set(EVALUATION_SETS)
    gated = calibrated["mode"] == "auto"
    head = f"auto:{calibrated['defence']}" if gated else "safeinfer"
    assert {r["mode"] for r in records} == {"off", "sa", "sgds", "safeinfer", head}
    assert all((r["gate"] is not None) == r["mode"].startswith("auto") for r in records)
    steered = {r["point"] for r in records if r["mode"] in ("sa", "safeinfer")}
    assert all(f"gamma={calibrated['gamma']}" in p for p in steered), steered
    summary = json.loads((out / "harmeval-ablate" / "summary.json").read_text())
    headline = next(p for p in summary["points"] if p["mode"] == head)
    first = result["goals"][0]
    assert first["goal"] == f"{head} ASR <= 5% on advbench-eval"
    assert first["measured"] == headline["datasets"]["advbench-eval"]["asr"]["keyword"]["macro"]
    assert first["met"] == (first["measured"] <= 5)
    report = (out / "evidence.md").read_text()
    assert "| calibrate (ablate) |" in report and "| goal | measured | met |" in report
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
