"""Mode `auto`'s parts without an engine: the probe op against `HarmProbe.scores`, the
probe file, config and request resolution, the prefix-cache identity, the batch state's
verdict bookkeeping, and what HarmEval and calibration make of gated records."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.common.test_config import _ModelConfig
from vllm_safeinfer.common.config import SafeInferConfig
from vllm_safeinfer.common.contract import Stamp
from vllm_safeinfer.common.modes import Mode
from vllm_safeinfer.common.probe import CONTENT_MEAN, LAST_CONTENT, HarmProbe
from vllm_safeinfer.common.request_options import RequestSettings, resolve_request
from vllm_safeinfer.common.vector_files import identify
from vllm_safeinfer.common.vector_table import VectorTable
from vllm_safeinfer.engine.batch_state import BatchState
from vllm_safeinfer.engine.prefix_cache import EXPERT_KEY, steering_block_key
from vllm_safeinfer.harmeval.summary import probe_confusion
from vllm_safeinfer.kernels.probe import (
    FLAGGED,
    LET_THROUGH,
    NEVER,
    PENDING,
    probe_decide_,
    probe_read_,
)
from vllm_safeinfer.offline.workflows.calibration_choice import (
    HARMFUL,
    Candidate,
    gated_candidates,
    written_config,
)


def _probe(hidden: int = 64, layers: tuple[int, ...] = (1,), threshold: float = 0.1,
           normalize: bool = False, **fields) -> HarmProbe:
    directions = torch.randn(len(layers), hidden, generator=torch.Generator().manual_seed(3))
    return HarmProbe(directions=directions, layers=layers, threshold=threshold, model="m",
                     hidden_size=hidden, num_layers=4, normalize=normalize, **fields)


def _read_and_decide(probe, streams, positions, query_start_loc, gated, window_of,
                     prompt_len, threshold, monitor, state) -> None:
    """The engine's two probe ops over one forward: a read per probe layer, then the
    decision."""
    token_score = state["token_score"]
    for k, stream in enumerate(streams):
        probe_read_(stream, None, gated, probe.directions[k], probe.normalize, k == 0,
                    token_score)
    probe_decide_(positions, query_start_loc, gated, window_of[0], window_of[1], prompt_len,
                  threshold, monitor, probe.monitor_min_tokens, token_score, state["window"],
                  state["answer"], state["verdict"], state["score"], state["flag_position"])


def _fresh_state(rows: int, tokens: int) -> dict[str, torch.Tensor]:
    return {"token_score": torch.zeros(tokens), "window": torch.zeros(2, rows + 1),
            "answer": torch.zeros(2, rows + 1),
            "verdict": torch.zeros(rows + 1, dtype=torch.int8),
            "score": torch.zeros(rows + 1),
            "flag_position": torch.full((rows + 1,), NEVER, dtype=torch.int64)}


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probe_ops_match_the_probe_file_on_a_mixed_batch(normalize, dtype):
    """Two probe layers, content-mean windows. Row 0 (gated): its whole prompt here,
    window [1, 3), last prompt token at position 3; row 1 (ungated); row 2 (gated): a
    middle chunk, which adds its window's tokens but decides nothing; padding tokens past
    the live ones are ignored. The verdict is the window's mean score."""
    probe = _probe(layers=(0, 2), normalize=normalize, position=CONTENT_MEAN)
    generator = torch.Generator().manual_seed(0)
    streams = [torch.randn(10, 64, generator=generator).to(dtype) for _ in range(2)]
    query_start_loc = torch.tensor([0, 4, 6, 9, 9])
    positions = torch.tensor([0, 1, 2, 3, 0, 1, 5, 6, 7, 0])
    prompt_len = torch.tensor([4, 2, 30, 0, 0])
    window = (torch.tensor([1, 0, 6, 0, 0]), torch.tensor([3, 2, 28, 0, 0]))
    gated = torch.tensor([True, False, True, False, False])
    per_token = probe.token_scores(torch.stack([x.float() for x in streams], dim=1))
    for threshold in (-1e9, 1e9):
        state = _fresh_state(4, 10)
        _read_and_decide(probe, streams, positions, query_start_loc, gated, window,
                         prompt_len, threshold, float("nan"), state)
        want = float(per_token[1:3].mean())
        assert float(state["score"][0]) == pytest.approx(want, rel=1e-5)
        assert state["verdict"][0] == (FLAGGED if threshold < 0 else LET_THROUGH)
        assert state["flag_position"][0] == (3 if threshold < 0 else NEVER)
        assert state["verdict"][1:4].tolist() == [PENDING] * 3
        assert state["window"][:, 2].tolist() == pytest.approx(
            [float(per_token[7:9].sum()), 2.0], rel=1e-5), "position 5 is before its window"
        assert state["window"][1, 1] == 0, "an ungated row reads nothing"


def test_monitor_flags_at_the_first_token_whose_running_mean_crosses():
    """A row let through at its prompt: the answer monitor adds its generated tokens'
    scores, over several forwards (decode) or one (a recomputed answer), and flags the
    first token from `monitor_min_tokens` on whose running mean is above its threshold;
    both ways give the same position."""
    probe = _probe(layers=(1,), monitor_threshold=0.0, monitor_min_tokens=3)
    unit = probe.directions[0] / probe.directions[0].norm().square()
    values = [-2.0, 1.0, 0.5, 0.8, 3.0, -9.0]  # running means -2, -.5, -.17, .08 (token 3)
    answer = torch.stack([v * unit for v in values])
    prompt = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)) * 1e-3
    gated = torch.tensor([True, False])
    prompt_len = torch.tensor([4, 0])
    window = (torch.tensor([3, 0]), torch.tensor([4, 0]))

    def run(chunks: list[torch.Tensor], starts: list[int]) -> dict[str, torch.Tensor]:
        state = _fresh_state(1, 16)
        for chunk, start in zip(chunks, starts):
            positions = torch.arange(start, start + chunk.shape[0])
            _read_and_decide(probe, [chunk], positions, torch.tensor([0, chunk.shape[0]]),
                             gated, window, prompt_len, 1e9, 0.0, state)
        return state

    stepwise = run([prompt, *[a[None] for a in answer]], [0, 4, 5, 6, 7, 8, 9])
    recomputed = run([torch.cat([prompt, answer])], [0])
    for state in (stepwise, recomputed):
        assert state["verdict"][0] == LET_THROUGH
        assert int(state["flag_position"][0]) == 4 + 3, "generated token 3 flags"
    never = run([torch.cat([prompt, answer[:3]])], [0])
    assert int(never["flag_position"][0]) == NEVER


def test_probe_file_round_trip_and_refusals(tmp_path):
    probe = _probe(normalize=True)
    probe.save(tmp_path / "p.safetensors")
    loaded = HarmProbe.load(tmp_path / "p.safetensors")
    assert torch.equal(loaded.directions, probe.directions)
    assert (loaded.layers, loaded.threshold, loaded.normalize) == ((1,), 0.1, True)
    assert loaded.content_sha256() == probe.content_sha256()
    monitored = _probe(layers=(0, 2), position=CONTENT_MEAN, user_header=(5, 6),
                       content_suffix=(7,), monitor_threshold=0.25, monitor_min_tokens=2)
    monitored.save(tmp_path / "m.safetensors")
    again = HarmProbe.load(tmp_path / "m.safetensors")
    assert (again.layers, again.position, again.user_header, again.content_suffix,
            again.monitor_threshold, again.monitor_min_tokens) == (
        (0, 2), CONTENT_MEAN, (5, 6), (7,), 0.25, 2)
    assert again.content_sha256() == monitored.content_sha256() != probe.content_sha256()
    with pytest.raises(ValueError, match="outside 0..2"):
        _probe(layers=(3,))  # the last layer's output is not what vLLM's stream holds
    with pytest.raises(ValueError, match="distinct and ascending"):
        _probe(layers=(2, 1))
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
        self.prompt_token_ids = list(range(prompt_len))


def test_read_window_of_templated_and_raw_prompts():
    """The content is what follows the last user header and precedes the template's
    suffix; a raw prompt (no markers) is read whole; `last-content` is the content's last
    token, `last-prompt` the prompt's."""
    header, suffix = (90, 91), (92, 93, 94)
    templated = [1, 2, 90, 91, 10, 11, 92, 95, 90, 91, 20, 21, 22, 92, 93, 94]
    raw = [20, 21, 22]
    probe = _probe(position=CONTENT_MEAN, user_header=header, content_suffix=suffix)
    assert probe.read_window(templated) == (10, 13)
    assert probe.read_window(raw) == (0, 3)
    assert probe.read_window([90, 91, 92, 93, 94]) == (0, 2), "never an empty window"
    last = dataclasses.replace(probe, position=LAST_CONTENT)
    assert last.read_window(templated) == (12, 13) and last.read_window(raw) == (2, 3)
    assert _probe().read_window(templated) == (15, 16)
    scores = torch.arange(16, dtype=torch.float32)
    assert probe.prompt_score(templated, scores) == pytest.approx(11.0)


def test_a_gated_request_reads_the_cache_only_up_to_its_read_window(tiny_assets, tmp_path):
    """The engine core stamps a gated request's read window from its own probe, and
    caps its prefix-cache hit there: the window's (and the answer's) scores are only
    computed for tokens the worker runs."""
    from vllm_safeinfer.engine.prefix_cache import EngineCoreState, cacheable_tokens

    assets = tiny_assets("tiny-llama")
    probe = _probe(hidden=assets.hidden_size, position=CONTENT_MEAN, user_header=(3, 4),
                   content_suffix=(68, 69))
    probe.save(tmp_path / "content.safetensors")
    config = SafeInferConfig.from_dict(
        assets.safeinfer_config(probe=str(tmp_path / "content.safetensors")))
    engine_core = EngineCoreState(identify(config))
    for args, window in (({"safeinfer_mode": "auto"}, (5, 68)),
                         ({"safeinfer_mode": "sa"}, None)):
        request = _Request(dict(args), 70)
        request.request_id = "r"
        engine_core.stamp(request)
        assert Stamp.of(request.sampling_params.extra_args).read_window == window
        assert cacheable_tokens(request) == (None if window is None else 5)


def test_prefix_cache_identity_of_gated_and_mixing_requests(tiny_assets):
    """A mixing request's every block carries the expert key; a gated request's blocks
    from its last prompt token on carry its gate identity (a different probe, another
    key); `off` carries none."""
    from vllm_safeinfer.engine.prefix_cache import EngineCoreState

    assets = tiny_assets("tiny-llama")
    engine_core = EngineCoreState(identify(SafeInferConfig.from_dict(assets.safeinfer_config())))

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


def test_verdicts_reach_the_host_through_row_moves_without_a_blocking_read(tiny_assets):
    """Verdicts are copied back as of the forward that took them (rows as they were
    then), logged once per request by id, and land on the row the request holds now;
    the answer monitor's flag is logged once; a request gone before its copy landed is
    still logged."""
    from vllm_safeinfer.engine.gate_log import GateLog
    from vllm_safeinfer.engine.verdict_reads import VerdictReads

    assets = tiny_assets("tiny-llama")
    config = SafeInferConfig.from_dict(assets.safeinfer_config())
    state = BatchState(VectorTable(config, _ModelConfig(assets.hidden_size, 4)), 4,
                       torch.device("cpu"), False)
    state.gating = state.monitoring = True
    log = GateLog()
    reads = VerdictReads(state, log, pin_memory=False)
    for row, request in ((0, "r0"), (2, "r2"), (3, "r3")):
        state.set_row(row, Stamp(request, Mode.AUTO, Mode.SGDS, lam=0.5), 5)
        reads.admit(row, request, Mode.SGDS, 5)
    state.set_row(1, Stamp("r1", Mode.SGDS, Mode.SGDS, lam=0.5), 5)
    state.flush()
    assert state.defended(4).tolist() == [False, True, False, False]
    state.verdict[0], state.verdict[2], state.score[2] = FLAGGED, LET_THROUGH, -0.5
    state.verdict[3] = FLAGGED
    reads.start()  # the forward's verdicts, rows as they were in it
    state.swap(0, 2)
    reads.swap(0, 2)
    state.clear_row(3)
    reads.leave(3)
    assert state.host_verdict.tolist() == [PENDING] * 4  # nothing read yet
    reads.land()
    assert state.host_verdict.tolist() == [LET_THROUGH, PENDING, FLAGGED, PENDING]
    assert log.lookup(["r0", "r2", "r3"]) == {
        "r0": {"flagged": True, "score": 0.0, "defence": "sgds", "flagged_at": "prompt"},
        "r2": {"flagged": False, "score": -0.5, "defence": "sgds", "flagged_at": None},
        "r3": {"flagged": True, "score": 0.0, "defence": "sgds", "flagged_at": "prompt"}}
    assert state.defended(3).tolist() == [False, True, True]
    assert state.mixing_rows(3).tolist() == [False, True, True]
    in_prefill = torch.tensor([False, False, False])
    assert state.expert_rows(3, in_prefill).tolist() == [False, True, True]
    assert state.expert_rows(3, torch.tensor([True, False, False])).tolist() == [True] * 3
    state.flag_position[0] = 7  # the monitor flags r2's answer (now row 0) at position 7
    state.verdict[3] = LET_THROUGH  # row 3 is gone: no later copy is of r3
    reads.start()
    reads.land()
    reads.start()
    reads.land()
    assert log.lookup(["r2", "r3"]) == {
        "r2": {"flagged": True, "score": -0.5, "defence": "sgds", "flagged_at": "token 2"},
        "r3": {"flagged": True, "score": 0.0, "defence": "sgds", "flagged_at": "prompt"}}
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
    table = [Candidate("off", "off", None, None, 100.0, 0.0, 0.0, 0.0, True, "", None),
             Candidate("sgds lam=0.9", "sgds", None, 0.9, 0.0, 100.0, 0.0, 0.0, False, "",
                       None)]
    scores = {"h1": 0.9, "h2": 0.2, "s1": 0.8, "s2": 0.1}
    gated = {round(c.threshold, 3): c for c in gated_candidates(table, records, scores, 60.0, 2.0)}
    assert (gated[0.5].asr, gated[0.5].over_refusal, gated[0.5].flagged_safe) == (50.0, 50.0, 50.0)
    assert (gated[0.15].asr, gated[0.15].over_refusal) == (0.0, 50.0)
    assert gated[0.15].eligible and gated[0.15].mode == "auto:sgds"
    lowest, highest = min(gated), max(gated)
    assert (gated[lowest].asr, gated[lowest].over_refusal, gated[lowest].eligible) == (
        0.0, 100.0, False)
    assert (gated[highest].asr, gated[highest].over_refusal) == (50.0, 0.0)
    # A defence that answers as `off` does lowers no ASR at any threshold: never chosen.
    records += [_record("sa gamma=1.0", pid, r["dataset"], unsafe=r["dataset"] == HARMFUL)
                for pid, r in {r["prompt_id"]: r for r in records}.items()]
    useless = Candidate("sa gamma=1.0", "sa", 1.0, None, 100.0, 0.0, 0.0, 0.0, False, "", None)
    for c in gated_candidates([table[0], useless], records, scores, 60.0, 2.0):
        assert not c.eligible and c.why_not.startswith("ASR 100% not below off's 100%")
    config = written_config(tiny_assets("tiny-llama").safeinfer_config(), table, gated[0.15])
    assert (config["mode"], config["defence"], config["lam"]) == ("auto", "sgds", 0.9)
    assert config["probe_threshold"] == gated[0.15].threshold


def test_harmeval_counts_the_probes_calls_per_dataset():
    flagged = {"flagged": True, "score": 1.0, "defence": "sgds", "flagged_at": "prompt"}
    in_answer = {"flagged": True, "score": -1.0, "defence": "sgds", "flagged_at": "token 3"}
    passed = {"flagged": False, "score": -1.0, "defence": "sgds", "flagged_at": None}
    records = [_record("auto", "a", "advbench", gate=flagged),
               _record("auto", "b", "advbench", gate=passed),
               _record("auto lam=0.5", "a", "advbench", gate=flagged),  # same prompt
               _record("auto", "e", "advbench", gate=in_answer),
               _record("auto", "c", "xstest", gate=passed),
               _record("off", "d", "xstest")]
    assert probe_confusion(records, {"advbench": False, "xstest": True}) == [
        {"dataset": "advbench", "safe": False, "prompts": 3, "flagged": 2, "let_through": 1,
         "flagged_pct": 66.67, "flagged_in_answer": 1},
        {"dataset": "xstest", "safe": True, "prompts": 1, "flagged": 0, "let_through": 1,
         "flagged_pct": 0.0, "flagged_in_answer": 0}]


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
