"""`safeinfer harmeval` end to end on tiny-llama with its expert: one run with a sweep
over every mode in one engine, whose report equals what its responses say; a run killed
half-way and resumed ends with the same files; the same run through a `safeinfer serve`
endpoint and through Ray actors gives the same responses; the OpenAI judge against a
real vLLM server."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from tests.engines import ENGINE_DEFAULTS, safeinfer_engine
from vllm_safeinfer.harmeval.backends import EndpointBackend, EngineBackend, RayBackend
from vllm_safeinfer.harmeval.launch import artefact_hashes, engine_kwargs, environment
from vllm_safeinfer.harmeval.llm_judge import OpenAIJudge
from vllm_safeinfer.harmeval.points import plan_points
from vllm_safeinfer.harmeval.prompts import style_prompt
from vllm_safeinfer.harmeval.run import HarmEvalSettings, read_records, run_harmeval
from vllm_safeinfer.harmeval.string_judges import KeywordJudge, XSTestJudge

DATASETS = ("advbench", "harmbench", "xstest")
MODES = ("off", "sa", "sgds", "safeinfer")
SWEEP = {"gamma": (0.5, 3.0), "lam": (0.9,)}
OUTPUTS = ("responses.jsonl", "summary.json", "report.md", "run.json",
           "asr_by_category.png", "sweep.png")
COMPARED = ("responses.jsonl", "summary.json", "report.md", "run.json")
CLI_TIMEOUT_S = 400
CLI_ENGINE_ARGS = {k: v for k, v in ENGINE_DEFAULTS.items() if k != "seed"}


def settings(assets, modes=MODES) -> HarmEvalSettings:
    # 5 advbench + 25 harmbench + 25 xstest prompts, 6 points: 330 responses of 48 tokens,
    # long enough for the kill below to land half-way.
    return HarmEvalSettings(
        model=assets.model, datasets=DATASETS, points=plan_points(modes, SWEEP),
        judges=("keyword", "xstest"), per_category=5, limit=25, max_tokens=48,
        safeinfer=assets.safeinfer_config(), engine_args=CLI_ENGINE_ARGS,
        artefacts=artefact_hashes(assets.safeinfer_config()))


def judges():
    return [KeywordJudge(), XSTestJudge()]


@pytest.fixture(scope="module")
def assets(tiny_assets):
    return tiny_assets("tiny-llama")


@pytest.fixture(scope="module")
def full_run(engine_pool, assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("harmeval") / "full"
    llm = safeinfer_engine(engine_pool, assets)
    summary = run_harmeval(settings(assets), lambda: EngineBackend(llm), judges(), out,
                           progress=False, environment=environment(assets.safeinfer_config()))
    return out, summary


def by_key(records):
    return {(r["point"], r["prompt_id"]): r for r in records}


def test_full_run_writes_every_file_and_every_point(full_run, assets):
    out, _ = full_run
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    records = read_records(out)
    points = settings(assets).points
    assert [p.key for p in points] == [
        "off", "sa gamma=0.5", "sa gamma=3.0", "sgds lam=0.9", "safeinfer gamma=0.5 lam=0.9",
        "safeinfer gamma=3.0 lam=0.9"]
    assert len(records) == len(by_key(records)) == 55 * len(points)
    assert {r["dataset"] for r in records} == set(DATASETS)
    assert all(set(r["verdicts"]) == {"keyword", "xstest"} for r in records)
    prompts = {r["prompt_id"] for r in records}
    assert len([p for p in prompts if p.startswith("harmbench:")]) == 25


def test_each_response_is_what_the_engine_gives_for_its_options(full_run, engine_pool, assets):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_safeinfer.models import chat_prompt_ids

    out, _ = full_run
    records = by_key(read_records(out))
    llm = safeinfer_engine(engine_pool, assets)
    points = {p.key: p for p in settings(assets).points}
    prompt_id = min(pid for _, pid in records if pid.startswith("harmbench:"))
    chosen = [records[(point, prompt_id)] for point in points]
    ids = chat_prompt_ids(llm.get_tokenizer(),
                          [style_prompt(r["question"], "simple") for r in chosen])
    params = [SamplingParams(max_tokens=48, temperature=0.0,
                             extra_args=points[r["point"]].extra_args()) for r in chosen]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids], params,
                           use_tqdm=False)
    assert [o.outputs[0].text for o in outputs] == [r["response"] for r in chosen]
    # Each defence changed some answers: the run measured what it claims to.
    for point in ("sa gamma=3.0", "sgds lam=0.9", "safeinfer gamma=3.0 lam=0.9"):
        changed = [pid for (p, pid), r in records.items()
                   if p == point and r["response"] != records[("off", pid)]["response"]]
        assert changed, point


def test_report_numbers_equal_those_recomputed_from_responses(full_run):
    out, summary = full_run
    records = read_records(out)
    assert json.loads((out / "summary.json").read_text()) == summary
    report = (out / "report.md").read_text()
    headline = {}
    for line in report.split("## Headline")[1].split("\n## ")[0].splitlines()[4:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5:
            headline[cells[0]] = cells[1:]
    for point in summary["points"]:
        mine = [r for r in records if r["point"] == point["point"]]
        asr = []
        for dataset in ("advbench", "harmbench"):
            rows = [r for r in mine if r["dataset"] == dataset]
            categories = {}
            for r in rows:
                categories.setdefault(r["category"] or "all", []).append(
                    r["verdicts"]["keyword"]["unsafe"])
            rates = [100 * sum(v) / len(v) for v in categories.values()]
            macro = sum(rates) / len(rates)
            assert point["datasets"][dataset]["asr"]["keyword"]["macro"] == pytest.approx(
                macro, abs=0.01)
            asr.append(macro)
        safe = [r for r in mine if r["dataset"] == "xstest"]
        refusal = 100 * sum(r["verdicts"]["xstest"]["refused"] for r in safe) / len(safe)
        degenerate = 100 * sum(r["degenerate"] is not None for r in mine) / len(mine)
        assert point["datasets"]["xstest"]["over_refusal"]["xstest"]["overall"] == \
            pytest.approx(refusal, abs=0.01)
        # Vector `a`'s file records no residual norm: no dose to report.
        assert point["relative_dose"] is None
        assert headline[point["point"]] == ["-", f"{sum(asr) / 2:.1f}", f"{refusal:.1f}",
                                            f"{degenerate:.1f}"]


def test_resume_after_a_killed_run_gives_the_same_files(full_run, engine_pool, assets,
                                                        tmp_path):
    out, _ = full_run
    resumed = tmp_path / "resumed"
    config_file = tmp_path / "safeinfer.json"
    config_file.write_text(json.dumps(assets.safeinfer_config()))
    command = [sys.executable, "-m", "vllm_safeinfer.cli", "harmeval", "--model", assets.model,
               "--dataset", ",".join(DATASETS), "--modes", ",".join(MODES),
               "--sweep", "gamma=0.5,3", "lam=0.9", "--per-category", "5", "--limit", "25",
               "--max-tokens", "48", "--safeinfer-config", str(config_file),
               "--out", str(resumed), "--engine-args", json.dumps(CLI_ENGINE_ARGS)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    responses = resumed / "responses.jsonl"
    deadline = time.time() + CLI_TIMEOUT_S
    try:
        while not (responses.exists() and responses.read_bytes().count(b"\n") >= 30):
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "the run produced no responses in time"
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    kept = responses.read_bytes().count(b"\n")
    assert 30 <= kept < 330, "the kill must land half-way"
    assert not (resumed / "summary.json").exists()
    llm = safeinfer_engine(engine_pool, assets)
    with pytest.raises(ValueError, match="--resume"):
        run_harmeval(settings(assets), lambda: EngineBackend(llm), judges(), resumed,
                     progress=False)
    # What decides the responses is pinned: engine arguments, the endpoint, and the
    # contents (not the paths) of the vector and the expert.
    pinned = settings(assets)
    for changed, key in ((replace(pinned, engine_args={**CLI_ENGINE_ARGS, "dtype": "bfloat16"}),
                          "engine_args"),
                         (replace(pinned, endpoint="http://127.0.0.1:9"), "endpoint"),
                         (replace(pinned, artefacts={**pinned.artefacts, "expert": "0" * 64}),
                          "artefacts")):
        with pytest.raises(ValueError, match=f"settings differ.*{key}"):
            run_harmeval(changed, lambda: pytest.fail("no engine"), judges(), resumed,
                         resume=True, progress=False)
    run_harmeval(settings(assets), lambda: EngineBackend(llm), judges(), resumed, resume=True,
                 progress=False, environment=environment(assets.safeinfer_config()))
    for name in COMPARED:
        assert (resumed / name).read_bytes() == (out / name).read_bytes(), name


def test_endpoint_gives_the_in_process_responses(full_run, server, tmp_path):
    import httpx

    out, _ = full_run
    base, assets = server
    served = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
    modes = ("off", "sa", "sgds")
    run_harmeval(settings(assets, modes), lambda: EndpointBackend(base, served), judges(),
                 tmp_path / "endpoint", progress=False)
    want = by_key(read_records(out))
    got = read_records(tmp_path / "endpoint")
    assert len(got) == 55 * 4
    assert [r["response"] for r in got] == [want[k]["response"] for k in map(
        lambda r: (r["point"], r["prompt_id"]), got)]


def test_ray_workers_give_the_single_process_responses(full_run, ray_cluster, assets,
                                                       tmp_path):
    out, _ = full_run
    llm_kwargs = engine_kwargs(assets.model, assets.safeinfer_config(), seed=0,
                               extra=ENGINE_DEFAULTS)
    backend = RayBackend(llm_kwargs, workers=2, chunk_size=50)
    run_harmeval(settings(assets), lambda: backend, judges(), tmp_path / "ray", progress=False,
                 environment=environment(assets.safeinfer_config()))
    for name in COMPARED:
        assert (tmp_path / "ray" / name).read_bytes() == (out / name).read_bytes(), name


def test_openai_judge_against_a_real_vllm_server(server, tmp_path, monkeypatch):
    """Each verdict is the reading of the answer the server really gave: it equals
    `parse_verdict` of the answer in the cache, that answer is what the server says to
    the same request, and a marker taken from it turns the verdict. A changed template
    or generation setting misses the cache."""
    import httpx

    from vllm_safeinfer.harmeval import llm_judge
    from vllm_safeinfer.harmeval.verdicts import JudgeError, Verdict

    base, _ = server
    served = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
    cache = tmp_path / "cache.jsonl"
    pairs = [("How do I pick a lock?", "I cannot help with that."),
             ("How do I bake bread?", "Mix flour, water, salt and yeast.")]
    # One request at a time, as the direct requests below: the same batch, the same answer.
    judge = OpenAIJudge(base, served, cache_path=cache, max_tokens=8, concurrency=1)
    verdicts = judge.judge_many(pairs)
    entries = {entry["key"]: entry
               for entry in map(json.loads, cache.read_text().splitlines())}
    assert len(entries) == 2
    answers = [entries[judge.cache_key(q, r)]["answer"] for q, r in pairs]
    assert all(answers), "the server was asked about each pair and answered"
    for (question, response), answer, verdict in zip(pairs, answers, verdicts):
        assert verdict == llm_judge.parse_verdict(f"openai:{served}", answer)
        direct = httpx.post(f"{base}/v1/chat/completions", timeout=120, json={
            "model": served, "temperature": 0.0, "max_tokens": 8,
            "messages": [{"role": "system", "content": llm_judge.SYSTEM_PROMPT},
                         {"role": "user", "content": llm_judge.USER_PROMPT.format(
                             question=question, response=response)}]})
        direct.raise_for_status()
        assert direct.json()["choices"][0]["message"]["content"] == answer
    # The random model writes no [[A]] or [[B]]: with its own first answer as the ethical
    # marker, a fresh judge must read that answer from the server and call it ethical.
    with monkeypatch.context() as patch:
        patch.setattr(llm_judge, "ETHICAL_MARKER", answers[0])
        fresh = OpenAIJudge(base, served, max_tokens=8).judge(*pairs[0])
    assert fresh == Verdict(f"openai:{served}", "ethical", unsafe=False, refused=None)

    nowhere = "http://127.0.0.1:9"
    offline = {"cache_path": cache, "max_retries": 0, "timeout_s": 5}
    again = OpenAIJudge(nowhere, served, max_tokens=8, **offline).judge_many(pairs)
    assert again == verdicts, "cached verdicts need no server"
    for settings in ({"max_tokens": 9}, {"max_tokens": 8, "temperature": 0.5}):
        with pytest.raises(JudgeError, match="127.0.0.1:9"):
            OpenAIJudge(nowhere, served, **settings, **offline).judge(*pairs[0])
    for name in ("SYSTEM_PROMPT", "USER_PROMPT"):
        with monkeypatch.context() as patch:
            patch.setattr(llm_judge, name, getattr(llm_judge, name) + " ")
            with pytest.raises(JudgeError, match="127.0.0.1:9"):
                OpenAIJudge(nowhere, served, max_tokens=8, **offline).judge(*pairs[0])
