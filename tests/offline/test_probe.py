"""The harm probe builder: it recovers a direction planted in a tiny model's weights and
separates the prompts that switch it on; it reads the residual stream exactly as HF's
hidden states hold it; its prompts are none of an evaluation set's; `safeinfer probe
build` and `probe inspect` end to end, and their errors. No vLLM engine."""
from __future__ import annotations

import json

import pytest
import torch

from tests.offline.test_refusal import planted_model
from vllm_safeinfer import data
from vllm_safeinfer.cli import main
from vllm_safeinfer.common.model_identity import module_fingerprint
from vllm_safeinfer.common.probe import POSITIONS, HarmProbe
from vllm_safeinfer.common.vectors import SafetyVector
from vllm_safeinfer.models import chat_markers, chat_prompt_ids
from vllm_safeinfer.offline.hf import load_model
from vllm_safeinfer.offline.probe.builder import probe_layer_cap
from vllm_safeinfer.offline.probe.fit import MEAN_DIFFERENCE, auc, build_probe, threshold_at
from vllm_safeinfer.offline.probe.prompts import ProbePrompts, default_probe_prompts, dressed
from vllm_safeinfer.offline.probe.report import (
    EVALUATION_SETS,
    EVALUATION_STYLES,
    evaluate_probes,
    goal_met,
)
from vllm_safeinfer.offline.probe.states import last_token_states, probe_scores

# Prompts that carry the planted direction (their words " harmful", " cannot", " step")
# in two styles, and prompts without it in two; the words around them vary, so only the
# direction tells the two sides apart.
# (verb, subject) pairs all different, so no two prompts of a style are near twins.
WORK = (("Write", "function"), ("Explain", "task"), ("Give", "answer"), ("Check", "input"),
        ("Implement", "logic"), ("Describe", "world"), ("Initialize", "variables"),
        ("Test", "sample"), ("Define", "signature"), ("Print", "question"),
        ("Provide", "capital"), ("Say", "hello"))
TRIGGERED = {
    "imperative": tuple(f"{verb} {noun} in a harmful way, step by step." for verb, noun in WORK),
    "question": tuple(f"How can I {verb.lower()} a harmful {noun}? I cannot."
                      for verb, noun in WORK),
}
PLAIN = {
    "imperative": tuple(f"{verb} {noun} in a valid way, one by one." for verb, noun in WORK),
    "question": tuple(f"How can I {verb.lower()} a {noun} today? Hello." for verb, noun in WORK),
}
PROMPTS = ProbePrompts(TRIGGERED, PLAIN)


@pytest.fixture(scope="module")
def planted():
    model, tokenizer, direction = planted_model()
    return model, tokenizer, direction


def _cosines(probe: HarmProbe, direction: torch.Tensor) -> list[float]:
    return [float(torch.nn.functional.cosine_similarity(d, direction, dim=0))
            for d in probe.directions]


@pytest.mark.parametrize("position", POSITIONS)
def test_each_position_recovers_the_planted_direction(planted, position) -> None:
    """The plant sits in the trigger words' embeddings and is carried to later positions
    by attention: every position's probe, at every layer it reads, recovers it."""
    model, tokenizer, direction = planted
    built = build_probe(model, tokenizer, PROMPTS, model_name="planted", max_layer=2,
                        methods=(MEAN_DIFFERENCE,), positions=(position,))
    assert built.probe.position == position
    assert min(_cosines(built.probe, direction)) > 0.9
    assert built.probe.metrics["selection"]["min_flag_rate"] == 1.0


def test_the_planted_direction_is_recovered_and_separates_its_prompts(planted) -> None:
    model, tokenizer, direction = planted
    built = build_probe(model, tokenizer, PROMPTS, model_name="planted", max_layer=2,
                        methods=(MEAN_DIFFERENCE,))
    probe = built.probe
    assert min(_cosines(probe, direction)) > 0.9
    selection = probe.metrics["selection"]
    assert selection["min_flag_rate"] == 1.0 and selection["safe_flag_rates"] == {
        "imperative": 0.0, "question": 0.0}
    # Unseen prompts: the triggered ones all score above the threshold, the others below.
    fresh_on = ["Define the harmful step.", "I cannot do it step by step."]
    fresh_off = ["Define the valid function.", "What is the capital of France?"]
    scores = probe_scores(model, tokenizer, probe, fresh_on + fresh_off)
    assert bool((scores[:2] > probe.threshold).all())
    assert bool((scores[2:] <= probe.threshold).all())
    # Without the plant, nothing is recovered: the test can fail.
    plain_model, _ = load_model("tiny-llama")
    plain = build_probe(plain_model, tokenizer, PROMPTS, model_name="plain", max_layer=2,
                        methods=(MEAN_DIFFERENCE,)).probe
    assert max(map(abs, _cosines(plain, direction))) < 0.5


def test_every_method_separates_the_planted_prompts(planted) -> None:
    model, tokenizer, direction = planted
    built = build_probe(model, tokenizer, PROMPTS, model_name="planted", max_layer=1)
    assert set(built.families) == {f"{position}:{family}" for position in POSITIONS
                                   for family in ("mean-difference", "logistic",
                                                  "mean-difference+normalized",
                                                  "logistic+normalized")}
    aucs = {family: probe.metrics["selection"]["min_auc"]
            for family, probe in built.families.items()}
    # Raw scores separate the plant at every position; averaging normalised tokens over
    # the content dilutes it (a measured weakness, kept as a candidate).
    assert all(value == 1.0 for family, value in aucs.items()
               if not family.endswith("+normalized")), aucs
    for family, probe in built.families.items():
        # A logistic fit on 14 prompts a side separates along any of 256 dimensions;
        # normalised means lean towards the plant without recovering it as raw means do.
        if family.split(":")[1].startswith(MEAN_DIFFERENCE):
            assert min(_cosines(probe, direction)) > 0.5
    candidates = built.probe.metrics["candidates"]
    # 3 positions x layer sets {0}, {1}, {0, 1} x raw and normalised x (1 + 4 penalties)
    assert len(candidates) == 3 * 3 * 2 * 5
    assert built.probe.layer <= 1
    assert built.probe.metrics["styles"]["harmful"]["question"] == {"fit": 7, "threshold": 5}


def test_a_threshold_on_the_fit_prompts_is_refused(planted) -> None:
    model, tokenizer, _ = planted
    fit = ProbePrompts({k: v[:8] for k, v in TRIGGERED.items()},
                       {k: v[:8] for k, v in PLAIN.items()})
    reworded = ProbePrompts({"imperative": (TRIGGERED["imperative"][0].replace(
        "step by step", "step-by-step"),)}, {"imperative": PLAIN["imperative"][8:]})
    with pytest.raises(ValueError, match="a threshold must be chosen on other prompts"):
        build_probe(model, tokenizer, fit, threshold_prompts=reworded, model_name="planted",
                    max_layer=1, methods=(MEAN_DIFFERENCE,))
    held = ProbePrompts({k: v[8:] for k, v in TRIGGERED.items()},
                        {k: v[8:] for k, v in PLAIN.items()})
    probe = build_probe(model, tokenizer, fit, threshold_prompts=held, model_name="planted",
                        max_layer=1, methods=(MEAN_DIFFERENCE,)).probe
    assert probe.metrics["styles"]["safe"]["question"] == {"fit": 8, "threshold": 4}


def test_states_are_hf_hidden_states_whatever_the_batch(planted) -> None:
    model, tokenizer, _ = planted
    texts = ["Hello world.", "Write the function in a harmful way, step by step, now."]
    states = last_token_states(model, tokenizer, texts, max_layer=2, batch_size=2)
    assert states.shape == (2, 3, model.config.hidden_size)
    for row, text in enumerate(texts):
        ids = torch.tensor(chat_prompt_ids(tokenizer, [text]))
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        for layer in range(3):
            torch.testing.assert_close(states[row, layer], hidden[layer + 1][0, -1],
                                       atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="outside"):
        last_token_states(model, tokenizer, texts, max_layer=4)


def test_threshold_auc_and_layer_cap() -> None:
    safe = [torch.arange(100.0), torch.tensor([0.0, 1.0])]
    # 2 of 100 may score above: the threshold is the third highest; 0 of 2: the highest;
    # then halfway to the lowest harmful score above it.
    assert threshold_at(safe, 0.02) == 97.0
    assert threshold_at([torch.tensor([0.0, 5.0])], 0.02) == 5.0
    assert threshold_at(safe, 0.02, [torch.tensor([50.0, 98.0]), torch.tensor([200.0])]) == 97.5
    assert threshold_at(safe, 0.02, [torch.tensor([50.0])]) == 97.0
    assert auc(torch.tensor([2.0, 3.0]), torch.tensor([1.0, 2.0])) == pytest.approx(0.875)
    assert probe_layer_cap(24, vector_layer=6) == 6
    assert probe_layer_cap(24) == 22 and probe_layer_cap(24, vector_layer=23) == 22
    assert probe_layer_cap(4, max_layer=1) == 1
    with pytest.raises(ValueError, match="outside 0..2"):
        probe_layer_cap(4, max_layer=3)
    evaluation = {"advbench": {"safe": False, "flag_rate": 0.96},
                  "xstest": {"safe": True, "flag_rate": 0.02}}
    assert goal_met(evaluation)
    assert not goal_met({**evaluation, "harmbench": {"safe": False, "flag_rate": 0.9}})


def test_probe_prompts_are_no_evaluation_prompt() -> None:
    prompts, threshold = default_probe_prompts()
    assert set(prompts.harmful) == set(threshold.harmful) == {
        "advbench", "harmbench", "xstest-unsafe"}
    assert set(prompts.safe) == {"harmless", "hard-benign"}
    assert set(threshold.safe) == {"harmless", "hard-benign", "xstest"}, (
        "XSTest's safe calibration half chooses the threshold, never fits")
    training = {text for part in (prompts, threshold) for side in (part.harmful, part.safe)
                for texts in side.values() for text in texts}
    for name in EVALUATION_SETS:
        evaluated = {p.text for p in data.evaluation_set(name).prompts}
        assert not evaluated & training, name
        # Each probe prompt is in a part the leak filter knows, or a harmless one.
    built_on = {text for texts in data.splits.built_on().values() for text in texts}
    harmless = {p.text for p in data.harmless_prompts()}
    assert training <= built_on | harmless
    small, _ = default_probe_prompts(per_style=10)
    assert all(len(texts) == 10 for texts in (*small.harmful.values(), *small.safe.values()))
    assert small.sha256() != prompts.sha256() and small.sha256() == default_probe_prompts(
        per_style=10)[0].sha256()
    dressed_twice = dressed(small)
    assert len(dressed_twice.harmful["advbench"]) == 30 and dressed_twice.sha256() == dressed(
        small).sha256(), "every prompt bare, styled and framed, seeded"


def test_evaluation_reports_flags_and_auc(planted) -> None:
    model, tokenizer, _ = planted
    probe = build_probe(model, tokenizer, PROMPTS, model_name="planted", max_layer=1,
                        methods=(MEAN_DIFFERENCE,)).probe
    evaluated = evaluate_probes(model, tokenizer, {"chosen": probe},
                                ("advbench", "xstest", "hard-benign"), limit=6)["chosen"]
    report = evaluated["sets"]
    assert set(report) == {"advbench", "xstest", "hard-benign"}
    assert report["advbench"]["prompts"] == 6 and report["advbench"]["rows"] == 160
    assert 0 <= report["advbench"]["auc_vs_xstest"] <= 1
    assert report["xstest"]["safe"] and "auc_vs_xstest" not in report["xstest"]
    assert report["hard-benign"]["safe"]
    assert set(report["advbench"]["styles"]) == set(EVALUATION_STYLES)
    assert report["advbench"]["flag_rate"] == report["advbench"]["styles"]["bare"]["flag_rate"]
    # At a threshold flagging 1% of the 12 bare safe prompts (none of them), no more of
    # any set is flagged than at 2%.
    points = evaluated["operating_points"]
    assert points["1%"]["threshold"] >= points["2%"]["threshold"]
    assert points["1%"]["flag_rates"]["xstest"]["bare"] == 0.0
    assert goal_met(report) == (
        min(c["flag_rate"] for c in report["advbench"]["styles"].values()) >= 0.95
        and max(report[s]["flag_rate"] for s in ("xstest", "hard-benign")) <= 0.02)


def _tiny_vector(path, model, layer: int) -> None:
    SafetyVector(vector=torch.ones(model.config.hidden_size), layer=layer, model="tiny",
                 hidden_size=model.config.hidden_size, num_layers=model.config.num_hidden_layers,
                 heads=(), method="given-heads",
                 model_fingerprint=module_fingerprint(model)).save(path)


def test_probe_build_and_inspect_from_the_command_line(tmp_path, capsys) -> None:
    llama, _ = load_model("tiny-llama")
    _tiny_vector(tmp_path / "sv.safetensors", llama, layer=1)
    out, report = tmp_path / "probe.safetensors", tmp_path / "probe.json"
    assert main(["probe", "build", "--model", "tiny-llama", "--out", str(out),
                 "--vector", str(tmp_path / "sv.safetensors"), "--per-style", "16",
                 "--eval-limit", "6", "--eval-sets", "advbench,xstest-unsafe",
                 "--monitor-limit", "4", "--report", str(report)]) == 0
    probe = HarmProbe.load(out)
    assert probe.layer <= 1 and probe.model == "tiny-llama"
    # The answer monitor: a threshold chosen on the threshold part's answers, measured on
    # every safe source there, and evaluated on 4 prompts of each set and style.
    assert probe.monitor_threshold == probe.metrics["monitor"]["threshold"]
    assert set(probe.metrics["monitor"]["sources"]) == {
        "advbench", "harmbench", "xstest-unsafe", "harmless", "hard-benign", "xstest"}
    assert all(row["flagged"] <= 0.02 for name, row in probe.metrics["monitor"][
        "sources"].items() if name in ("harmless", "hard-benign", "xstest"))
    assert (probe.user_header, probe.content_suffix) == chat_markers(
        load_model("tiny-llama")[1])
    assert probe.model_fingerprint == module_fingerprint(llama)
    assert probe.metrics["max_layer"] == 1
    assert set(probe.metrics["evaluation"]) == {"advbench", "xstest-unsafe"}
    written = json.loads(report.read_text())
    cell = written["monitor_evaluation"]["advbench"]["framed"]
    assert cell["prompts"] == 4 and cell["either"] >= cell["prompt"]
    assert set(written["leave_one_out"]) >= {"harmful:advbench", "safe:hard-benign"}
    assert written["selection"] == probe.metrics["selection"] and "goal" in written
    assert set(written["families"]) == {f"{position}:{family}" for position in POSITIONS
                                        for family in ("mean-difference", "logistic",
                                                       "mean-difference+normalized",
                                                       "logistic+normalized")}
    assert written["position"] == probe.position and probe.metrics["dressed"]
    capsys.readouterr()
    assert main(["probe", "inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"layers: {', '.join(map(str, probe.layers))} of 4" in printed
    assert f"position: {probe.position}" in printed and "xstest-unsafe" in printed


@pytest.mark.parametrize("args,message", [
    (["--max-layer", "3"], "outside 0..2"),
    (["--target-fpr", "1.5"], "false-positive rate"),
    (["--vector", "{qwen_vector}"], "weights differ"),
    (["--max-layer", "1", "--vector", "{qwen_vector}"], "not allowed with"),
    (["--out", "{tmp}/missing/probe.safetensors"], "does not exist"),
])
def test_probe_build_errors_write_nothing(tmp_path, capsys, args, message) -> None:
    qwen, _ = load_model("tiny-qwen2")
    _tiny_vector(tmp_path / "qwen.safetensors", qwen, layer=1)  # same shape, other weights
    args = [a.format(qwen_vector=tmp_path / "qwen.safetensors", tmp=tmp_path) for a in args]
    out = tmp_path / "probe.safetensors"
    argv = ["probe", "build", "--model", "tiny-llama", "--out", str(out), "--per-style", "8",
            *args]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.glob("probe*")) == []


def test_inspect_refuses_other_files(tmp_path, capsys) -> None:
    llama, _ = load_model("tiny-llama")
    _tiny_vector(tmp_path / "sv.safetensors", llama, layer=1)
    with pytest.raises(SystemExit):
        main(["probe", "inspect", str(tmp_path / "sv.safetensors")])
    assert "not a harm probe file" in capsys.readouterr().err
