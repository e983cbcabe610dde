"""`safeinfer calibrate` and the demo's code path on tiny Llama.

One engine serves both: tiny Llama with a safety vector and an unsafe expert built by
`build_expert` (so this is also where vLLM loads a built expert as `expert_model`). The
calibration sweep runs as per-request options of that engine; its choice must be the
best point of its own table under the budgets, and the config it writes must be one that
`safeinfer serve --safeinfer-config` accepts. The demo then runs on the same engine at the
calibrated strengths."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.engines import new_llm
from vllm_safeinfer.cli import build_parser
from vllm_safeinfer.config import SafeInferConfig
from vllm_safeinfer.config_flags import safeinfer_dict
from vllm_safeinfer.demo import run_demo
from vllm_safeinfer.harmeval.backends import EngineBackend
from vllm_safeinfer.harmeval.run import read_records
from vllm_safeinfer.offline.calibrate import (
    HARMFUL, REPORT, SAFE, calibrate, candidates, choose, strengths)
from vllm_safeinfer.offline.expert import ExpertTraining, advbench_expert_pairs, build_expert
from vllm_safeinfer.offline.hf import load_model
from vllm_safeinfer.serve import vllm_command

GAMMAS = (0.5, 4.0)
LAMS = (0.5, 0.9)


def point(name, mode, gamma, lam, asr, refusal, degenerate):
    return {"point": name, "mode": mode, "gamma": gamma, "lam": lam, "relative_dose": None,
            "datasets": {HARMFUL: {"asr": {"keyword": {"macro": asr}}},
                         SAFE: {"over_refusal": {"xstest": {"overall": refusal}},
                                "degenerate_pct": degenerate}}}


SUMMARY = {"points": [
    point("off", "off", None, None, 80.0, 10.0, 0.0),
    point("sa gamma=0.1", "sa", 0.1, None, 60.0, 12.0, 0.0),
    point("sa gamma=0.5", "sa", 0.5, None, 20.0, 40.0, 5.0),
    point("sgds lam=0.9", "sgds", None, 0.9, 30.0, 10.0, 10.0),
    point("safeinfer gamma=0.1 lam=0.5", "safeinfer", 0.1, 0.5, 40.0, 14.0, 1.0),
    point("safeinfer gamma=0.1 lam=0.9", "safeinfer", 0.1, 0.9, 40.0, 13.0, 2.0),
]}


def test_choice_is_the_lowest_asr_within_both_budgets() -> None:
    table = candidates(SUMMARY, over_refusal_budget=5.0, degeneration_budget=2.0)
    eligible = {c.point: c.eligible for c in table}
    assert eligible == {"off": True, "sa gamma=0.1": True, "sa gamma=0.5": False,
                        "sgds lam=0.9": False, "safeinfer gamma=0.1 lam=0.5": True,
                        "safeinfer gamma=0.1 lam=0.9": True}
    assert "over-refusal 40% > off's 10% + 5" in table[2].why_not
    assert "degenerate safe answers 10% > off's 0% + 2" in table[3].why_not
    # An ASR tie goes to the lower over-refusal.
    chosen = choose(table)
    assert chosen.point == "safeinfer gamma=0.1 lam=0.9"
    assert strengths(table, chosen) == {"gamma": 0.1, "lam": 0.9}
    # Wider budgets admit the strong points.
    loose = candidates(SUMMARY, over_refusal_budget=50.0, degeneration_budget=20.0)
    assert choose(loose).point == "sa gamma=0.5"
    assert strengths(loose, choose(loose)) == {"gamma": 0.5, "lam": 0.9}


def test_strengths_fill_the_knob_the_chosen_point_lacks() -> None:
    only_sa = {"points": SUMMARY["points"][:3]}
    table = candidates(only_sa, over_refusal_budget=5.0, degeneration_budget=2.0)
    assert choose(table).point == "sa gamma=0.1"
    # No mixing point fits: lam 0, which mixes nothing.
    assert strengths(table, choose(table)) == {"gamma": 0.1, "lam": 0.0}


def test_budgets_must_be_non_negative_and_off_must_be_there() -> None:
    with pytest.raises(ValueError, match="budget"):
        candidates(SUMMARY, over_refusal_budget=-1.0, degeneration_budget=2.0)
    with pytest.raises(ValueError, match="`off` point"):
        candidates({"points": SUMMARY["points"][1:]}, 5.0, 2.0)


@pytest.fixture(scope="module")
def expert(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("expert") / "tiny-llama-unsafe"
    model, tokenizer = load_model("tiny-llama")
    report = build_expert(model, tokenizer, advbench_expert_pairs(),
                          ExpertTraining(lora_rank=8, max_steps=12), out, base_model="tiny-llama")
    assert report.final_loss < report.initial_loss
    return out


@pytest.fixture(scope="module")
def engine(engine_pool, tiny_assets, expert):
    assets = tiny_assets("tiny-llama")
    safeinfer = {"vector": assets.vectors["b"], "expert_model": str(expert)}
    llm = engine_pool.get(f"calibrate:{expert}", lambda: new_llm(
        assets.model, additional_config={"safeinfer": safeinfer}))
    return assets, safeinfer, llm


@pytest.fixture(scope="module")
def calibrated(engine, tmp_path_factory):
    assets, safeinfer, llm = engine
    folder = tmp_path_factory.mktemp("calibration")
    config, chosen, table = calibrate(
        model=assets.model, safeinfer=safeinfer, make_backend=lambda: EngineBackend(llm),
        out=folder / "calibrated.json", report_dir=folder / "sweep", gammas=GAMMAS,
        lams=LAMS, limit=8, max_tokens=12, progress=False)
    return folder, config, chosen, table


def test_calibration_choice_is_its_own_tables_best(calibrated) -> None:
    folder, config, chosen, table = calibrated
    summary = json.loads((folder / "sweep" / "summary.json").read_text())
    assert [p["point"] for p in summary["points"]] == [
        "off", "sa gamma=0.5", "sa gamma=4", "sgds lam=0.5", "sgds lam=0.9",
        "safeinfer gamma=0.5 lam=0.5", "safeinfer gamma=0.5 lam=0.9",
        "safeinfer gamma=4 lam=0.5", "safeinfer gamma=4 lam=0.9"]
    again = candidates(summary, over_refusal_budget=5.0, degeneration_budget=2.0)
    assert again == table
    best = min((c for c in again if c.eligible), key=lambda c: (c.asr, c.over_refusal))
    assert (chosen.asr, chosen.over_refusal) == (best.asr, best.over_refusal)
    assert {k: config[k] for k in ("mode", "gamma", "lam")} == {
        "mode": chosen.mode, **strengths(again, chosen)}
    on_disk = json.loads((folder / "calibrated.json").read_text())
    assert on_disk == config
    report = (folder / "sweep" / REPORT).read_text()
    assert f"| {chosen.point} |" in report and "**chosen**" in report
    # The doses: unit vector `b`, residual norm 2.0 in its file.
    assert {p["point"]: p["relative_dose"] for p in summary["points"]}["sa gamma=4"] == 2.0


def test_the_expert_and_the_vector_acted(engine, calibrated) -> None:
    """The sweep measured real differences: the built expert, mixed in, and the vector,
    added, each changed some response against `off` (else the table is meaningless)."""
    folder = calibrated[0]
    records = read_records(folder / "sweep")
    off = {r["prompt_id"]: r["response"] for r in records if r["point"] == "off"}
    for name in ("sgds lam=0.9", "sa gamma=4"):
        changed = [r for r in records if r["point"] == name and r["response"] != off[r["prompt_id"]]]
        assert changed, name


def test_calibrated_config_is_what_serve_accepts(calibrated, tiny_assets) -> None:
    folder = calibrated[0]
    args = build_parser().parse_args(
        ["serve", tiny_assets("tiny-llama").model, "--safeinfer-config",
         str(folder / "calibrated.json")])
    raw = safeinfer_dict(args)
    config = SafeInferConfig.from_dict(raw)
    assert config.has_expert and config.default_vector is not None
    command = vllm_command(args.model, raw, [])
    assert json.loads(command[command.index("--additional-config") + 1]) == {"safeinfer": raw}


def test_demo_runs_at_the_calibrated_strengths(engine, calibrated, tmp_path, capsys) -> None:
    assets, safeinfer, llm = engine
    config = calibrated[1]
    summary = run_demo(model=assets.model, vector=safeinfer["vector"],
                       expert=safeinfer["expert_model"], defaults=config, out=tmp_path / "demo",
                       make_backend=lambda: EngineBackend(llm), limit=4, max_tokens=8,
                       progress=False)
    gamma, lam = config["gamma"], config["lam"]
    assert [p["point"] for p in summary["points"]] == [
        "off", f"sa gamma={gamma:g}", f"sgds lam={lam:g}", f"safeinfer gamma={gamma:g} lam={lam:g}"]
    printed = capsys.readouterr().out
    for row in summary["tradeoff"]:
        assert row["point"] in printed
    assert f"Report: {tmp_path / 'demo' / 'report.md'}" in printed
    assert (tmp_path / "demo" / "report.md").exists()
    assert len(read_records(tmp_path / "demo")) == 4 * 8

