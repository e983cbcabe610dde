"""Mode `auto`'s parts without an engine: the probe op against `HarmProbe.scores`, the
probe file, config and request resolution, the prefix-cache identity, the batch state's
verdict bookkeeping, and what HarmEval and calibration make of gated records."""
from __future__ import annotations

import pytest
import torch

from tests.test_config import _ModelConfig
from vllm_safeinfer.common.config import SafeInferConfig
from vllm_safeinfer.common.modes import Mode
from vllm_safeinfer.common.probe import HarmProbe
from vllm_safeinfer.common.request_options import RequestSettings, resolve_request
from vllm_safeinfer.common.vector_table import VectorTable
from vllm_safeinfer.engine.batch_state import FLAGGED, LET_THROUGH, PENDING, BatchState
from vllm_safeinfer.engine.gating import probe_
from vllm_safeinfer.engine.prefix_cache import EXPERT_KEY, steering_block_key
from vllm_safeinfer.harmeval.summary import probe_confusion
from vllm_safeinfer.offline.calibration_choice import Candidate, gated_candidates, written_config


def _probe(hidden: int = 64, layer: int = 1, threshold: float = 0.1,
           normalize: bool = False) -> HarmProbe:
    direction = torch.randn(hidden, generator=torch.Generator().manual_seed(3))
    return HarmProbe(direction=direction, layer=layer, threshold=threshold, model="m",
                     hidden_size=hidden, num_layers=4, normalize=normalize)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probe_op_matches_the_probe_file_on_a_mixed_batch(normalize, dtype):
    """Rows 0 (gated, last prompt token here), 1 (ungated), 2 (gated, middle chunk: no
    verdict), 3 (gated, decode: verdict kept from before); padding tokens past the live
    ones are ignored."""
    probe = _probe(normalize=normalize)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(12, 64, generator=generator).to(dtype)
    residual = torch.randn(12, 64, generator=generator).to(dtype)
    query_start_loc = torch.tensor([0, 4, 7, 10, 11])
    positions = torch.tensor([0, 1, 2, 3, 0, 1, 2, 10, 11, 12, 20, 0])
    prompt_len = torch.tensor([4, 3, 30, 5, 0, 0])
    gated = torch.tensor([True, False, True, True, False, False])
    verdict = torch.tensor([0, 0, 0, FLAGGED, 0, 0, 0], dtype=torch.int8)
    score = torch.zeros(7)
    for threshold in (-1e9, 1e9):
        probe_(hidden, residual, positions, query_start_loc, gated, prompt_len,
               probe.direction, threshold, normalize, verdict, score)
        want = probe.scores(hidden[3].float() + residual[3].float())
        assert score[0] == pytest.approx(float(want), rel=1e-5)
        assert verdict[0] == (FLAGGED if threshold < 0 else LET_THROUGH)
        assert verdict[1:6].tolist() == [PENDING, PENDING, FLAGGED, PENDING, PENDING]


def test_probe_file_round_trip_and_refusals(tmp_path):
    probe = _probe(normalize=True)
    probe.save(tmp_path / "p.safetensors")
    loaded = HarmProbe.load(tmp_path / "p.safetensors")
    assert torch.equal(loaded.direction, probe.direction)
    assert (loaded.layer, loaded.threshold, loaded.normalize) == (1, 0.1, True)
    assert loaded.content_sha256() == probe.content_sha256()
    with pytest.raises(ValueError, match="outside 0..2"):
        _probe(layer=3)  # the last layer's output is not what vLLM's stream holds
    with pytest.raises(ValueError, match="not a harm probe file"):
        from vllm_safeinfer.common.vectors import SafetyVector

        SafetyVector(vector=torch.ones(8), layer=0, model="m", hidden_size=8, num_layers=2,
                     heads=((0, 0),)).save(tmp_path / "v.safetensors")
        HarmProbe.load(tmp_path / "v.safetensors")
    with pytest.raises(ValueError, match="hidden size 64, the served model has 32"):
        probe.check_compatible(_ModelConfig(32, 4))


def test_auto_config_and_request_resolution(tiny_assets):
    assets = tiny_assets("tiny-llama")
    config = SafeInferConfig.from_dict(assets.safeinfer_config(mode="auto"))
    assert config.default_defence is Mode.SAFEINFER
    assert resolve_request(None, config) == RequestSettings(
        Mode.SAFEINFER, vector="a", lam=config.lam, gated=True)
    assert resolve_request({"safeinfer_mode": "auto", "safeinfer_defence": "sgds",
                            "safeinfer_lam": 0.5}, config) == RequestSettings(
        Mode.SGDS, lam=0.5, gated=True)
    with pytest.raises(ValueError, match="safeinfer_gamma has no effect in mode 'sgds'"):
        resolve_request({"safeinfer_defence": "sgds", "safeinfer_gamma": 1.0}, config)
    with pytest.raises(ValueError, match="safeinfer_defence has no effect in mode 'sa'"):
        resolve_request({"safeinfer_mode": "sa", "safeinfer_defence": "sgds"}, config)
    with pytest.raises(ValueError, match="safeinfer_defence must be sa, sgds or safeinfer"):
        resolve_request({"safeinfer_defence": "off"}, config)
    no_probe = SafeInferConfig.from_dict(assets.safeinfer_config(probe=None))
    with pytest.raises(ValueError, match="'auto' needs a harm probe"):
        resolve_request({"safeinfer_mode": "auto"}, no_probe)
    for raw, message in (({"mode": "auto", "vector": None}, "'auto' needs a harm probe"),
                         ({"defence": "off"}, "defence must be sa, sgds or safeinfer"),
                         ({"defence": "sgds"}, "needs an expert model"),
                         ({"probe_threshold": "x"}, "probe_threshold must be a number")):
        with pytest.raises(ValueError, match=message):
            SafeInferConfig.from_dict(raw)
    sa_only = SafeInferConfig.from_dict({"vector": assets.vectors["a"], "probe": assets.probe,
                                         "mode": "auto"})
    assert sa_only.default_defence is Mode.SA
    assert SafeInferConfig.from_dict(config.to_dict()) == config


class _Request:
    def __init__(self, extra_args: dict, prompt_len: int) -> None:
        self.sampling_params = type("P", (), {"extra_args": extra_args})()
        self.num_prompt_tokens = prompt_len


def test_prefix_cache_identity_of_gated_and_mixing_requests(tiny_assets):
    """A mixing request's every block carries the expert key; a gated request's blocks
    from its last prompt token on carry its gate identity (a different probe, another
    key); `off` carries none."""
    from vllm_safeinfer.engine.prefix_cache import EngineCoreState

    assets = tiny_assets("tiny-llama")
    engine_core = EngineCoreState(SafeInferConfig.from_dict(assets.safeinfer_config()))

    def keys(args: dict, gate: str = "p1") -> tuple[list, list]:
        request = _Request(dict(args), 70)
        request.request_id = "r"
        engine_core.gate = gate
        engine_core.stamp(request)
        return steering_block_key(request, 64), steering_block_key(request, 96)

    assert keys({"safeinfer_mode": "off"}) == ([], [])
    assert keys({"safeinfer_mode": "sgds"}) == ([EXPERT_KEY], [EXPERT_KEY])
    before, after = keys({"safeinfer_mode": "auto", "safeinfer_defence": "sgds"})
    assert before == [EXPERT_KEY] and after[0] == EXPERT_KEY and after[1][2] == 69
    assert keys({"safeinfer_mode": "auto", "safeinfer_defence": "sgds"}, "p2")[1] != after
    assert keys({"safeinfer_mode": "auto", "safeinfer_defence": "sa"})[0] == []


def test_batch_state_tracks_verdicts_through_row_moves(tiny_assets):
    assets = tiny_assets("tiny-llama")
    config = SafeInferConfig.from_dict(assets.safeinfer_config())
    state = BatchState(VectorTable(config, _ModelConfig(assets.hidden_size, 4)), 4,
                       torch.device("cpu"), False)
    state.gating = True
    gated = RequestSettings(Mode.SGDS, lam=0.5, gated=True)
    state.set_row(0, gated, 5)
    state.set_row(1, RequestSettings(Mode.SGDS, lam=0.5), 5)
    state.set_row(2, gated, 5)
    state.flush()
    assert state.defended(3).tolist() == [False, True, False]
    state.verdict[0], state.verdict[2], state.score[2] = FLAGGED, LET_THROUGH, -0.5
    assert state.read_verdicts() == [(0, True, 0.0), (2, False, -0.5)]
    assert state.read_verdicts() == []  # each verdict is reported once
    assert state.defended(3).tolist() == [True, True, False]
    in_prefill = torch.tensor([False, False, False])
    assert state.expert_rows(3, in_prefill).tolist() == [True, True, False]
    assert state.expert_rows(3, torch.tensor([False, False, True])).tolist() == [True] * 3
    state.swap(0, 2)
    assert state.defended(3).tolist() == [False, True, True]
    assert state.mixing_rows(3).tolist() == [False, True, True]
    state.clear_row(2)
    assert int(state.verdict[2]) == PENDING and not state.mixing_rows(3)[2]


def _record(point: str, prompt_id: str, dataset: str, *, unsafe: bool = False,
            refused: bool = False, gate: dict | None = None) -> dict:
    return {"point": point, "prompt_id": prompt_id, "dataset": dataset, "category": None,
            "degenerate": None, "gate": gate,
            "verdicts": {"keyword": {"unsafe": unsafe}, "xstest": {"refused": refused}}}


def test_calibration_scores_every_threshold_from_recorded_answers(tiny_assets):
    """Harmful h1, h2 (scores 0.9, 0.2) and safe s1, s2 (0.8, 0.1): `off` complies with
    all, `sgds` refuses all. Gated at 0.5, h1 and s1 take sgds's answers: ASR 50, over-
    refusal 50; at 0.15 all but s2: ASR 0, over-refusal 50; below every score: sgds."""

    records = []
    for pid, dataset in (("h1", "advbench-calibration"), ("h2", "advbench-calibration"),
                         ("s1", "xstest-calibration"), ("s2", "xstest-calibration")):
        harmful = dataset.startswith("advbench")
        records.append(_record("off", pid, dataset, unsafe=harmful))
        records.append(_record("sgds lam=0.9", pid, dataset, refused=not harmful))
    table = [Candidate("off", "off", None, None, 100.0, 0.0, 0.0, True, "", None),
             Candidate("sgds lam=0.9", "sgds", None, 0.9, 0.0, 100.0, 0.0, False, "", None)]
    scores = {"h1": 0.9, "h2": 0.2, "s1": 0.8, "s2": 0.1}
    gated = {round(c.threshold, 3): c for c in gated_candidates(table, records, scores, 60.0, 2.0)}
    assert (gated[0.5].asr, gated[0.5].over_refusal, gated[0.5].flagged_safe) == (50.0, 50.0, 50.0)
    assert (gated[0.15].asr, gated[0.15].over_refusal) == (0.0, 50.0)
    assert gated[0.15].eligible and gated[0.15].mode == "auto:sgds"
    lowest = min(gated)
    assert (gated[lowest].asr, gated[lowest].over_refusal, gated[lowest].eligible) == (
        0.0, 100.0, False)
    config = written_config(tiny_assets("tiny-llama").safeinfer_config(), table, gated[0.15])
    assert (config["mode"], config["defence"], config["lam"]) == ("auto", "sgds", 0.9)
    assert config["probe_threshold"] == gated[0.15].threshold


def test_harmeval_counts_the_probes_calls_per_dataset():
    flagged = {"flagged": True, "score": 1.0, "defence": "sgds"}
    passed = {"flagged": False, "score": -1.0, "defence": "sgds"}
    records = [_record("auto", "a", "advbench", gate=flagged),
               _record("auto", "b", "advbench", gate=passed),
               _record("auto lam=0.5", "a", "advbench", gate=flagged),  # same prompt
               _record("auto", "c", "xstest", gate=passed),
               _record("off", "d", "xstest")]
    assert probe_confusion(records, {"advbench": False, "xstest": True}) == [
        {"dataset": "advbench", "safe": False, "prompts": 2, "flagged": 1, "let_through": 1,
         "flagged_pct": 50.0},
        {"dataset": "xstest", "safe": True, "prompts": 1, "flagged": 0, "let_through": 1,
         "flagged_pct": 0.0}]


def test_harmeval_points_in_mode_auto():
    """`auto:DEFENCE` sweeps what the defence uses and asks for it per request; plain
    `auto` (the server's defence) sweeps both knobs like `safeinfer`."""
    from vllm_safeinfer.harmeval.points import MODES, plan_points

    assert {"auto", "auto:sa", "auto:sgds", "auto:safeinfer"} <= set(MODES)
    points = plan_points(["auto:sgds", "auto"], {"gamma": (0.5,), "lam": (0.9,)})
    assert [p.key for p in points] == ["auto:sgds lam=0.9", "auto gamma=0.5 lam=0.9"]
    assert points[0].extra_args() == {"safeinfer_mode": "auto", "safeinfer_defence": "sgds",
                                      "safeinfer_lam": 0.9}
    assert points[1].extra_args() == {"safeinfer_mode": "auto", "safeinfer_gamma": 0.5,
                                      "safeinfer_lam": 0.9}
    with pytest.raises(ValueError, match="unknown mode"):
        plan_points(["auto:off"], {})
