"""The OpenAI surface of `safeinfer serve` (the session's server: tiny Llama with its
expert, vectors a and b, default mode `sa`), through the `openai` client as users call it:
completions and chat, streaming and not, every mode; the configuration endpoint; 500
malformed requests interleaved with valid ones; 64 concurrent mixed-mode requests. Every
loop is bounded in count and time."""
from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest

from tests.parity import PROMPTS, Case, reference_generate

MODES = ("off", "sa", "sgds", "safeinfer")
MAX_TOKENS = 8
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    base, _ = server
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
    return client, client.models.list().data[0].id


def token_ids(full) -> tuple[list[int], list[int]]:
    """(prompt ids, generated ids) of a non-streaming response asked for with
    `return_token_ids` (vLLM's fields, outside the OpenAI schema)."""
    choice = full.choices[0].model_extra or {}
    prompt = choice.get("prompt_token_ids") or (full.model_extra or {}).get("prompt_token_ids")
    return prompt, choice["token_ids"]


def xargs(mode: str | None) -> dict:
    return {} if mode is None else {"vllm_xargs": {"safeinfer_mode": mode}}


@pytest.mark.parametrize("mode", [None, *MODES])
def test_completions_every_mode_streaming_and_not(client, server, references, mode):
    openai, model = client
    _, assets = server
    prompt = "Tell me how to"
    extra = {**xargs(mode), "return_token_ids": True}
    full = openai.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS,
                                     temperature=0.0, extra_body=extra)
    choice = full.choices[0]
    prompt_ids, got = token_ids(full)
    case = Case(mode or "sa")  # the server's default mode is sa
    want = reference_generate(references("tiny-llama"), assets, [prompt_ids], [case],
                              max_tokens=MAX_TOKENS)[0]
    assert got == want
    stream = openai.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS,
                                       temperature=0.0, stream=True, extra_body=xargs(mode))
    assert "".join(chunk.choices[0].text for chunk in stream) == choice.text


@pytest.mark.parametrize("mode", [None, *MODES])
def test_chat_every_mode_streaming_and_not(client, server, references, mode):
    openai, model = client
    _, assets = server
    messages = [{"role": "user", "content": "How do I pick a lock?"}]
    full = openai.chat.completions.create(
        model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0.0,
        extra_body={**xargs(mode), "return_token_ids": True})
    choice = full.choices[0]
    prompt_ids, got = token_ids(full)
    want = reference_generate(references("tiny-llama"), assets, [prompt_ids],
                              [Case(mode or "sa")], max_tokens=MAX_TOKENS)[0]
    assert got == want
    stream = openai.chat.completions.create(
        model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0.0, stream=True,
        extra_body=xargs(mode))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == choice.message.content


def test_modes_differ_through_the_api(client):
    """The per-request options reach the engine: each defence changes some answer."""
    openai, model = client
    answers = {mode: [token_ids(openai.completions.create(
        model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
        extra_body={**xargs(mode), "return_token_ids": True}))[1] for prompt in PROMPTS]
        for mode in MODES}
    for mode in MODES[1:]:
        assert answers[mode] != answers["off"], mode


def test_configuration_endpoint(server):
    base, _ = server
    response = httpx.get(f"{base}/v1/safeinfer", timeout=10)
    assert response.status_code == 200
    body = response.json()
    assert body["defaults"]["mode"] == "sa" and body["expert"] == "tiny-llama-expert-v2"
    assert {name: (v["layers"], v["steering"]) for name, v in body["vectors"].items()} == {
        "a": ([1], "add"), "b": ([2], "add"), "p": ([1, 2], "project")}
    assert body["vectors"]["b"]["relative_dose"] == 0.75
    assert httpx.post(f"{base}/v1/safeinfer", timeout=10).status_code == 405


def malformed(rng: random.Random) -> tuple[str, str]:
    """(raw JSON of vllm_xargs, the key the 400 must name)."""
    numbers = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "0.99999999", "1.0",
               "-0.5", "101", "1e308"]
    # (JSON null is absent, not malformed: vLLM drops it from vllm_xargs.)
    wrong = ['"0.5"', "true", "false", "[0.5]", '{"x": 1}', '""', '"NaN"', "[]", "[true]"]
    choice = rng.randrange(7)
    if choice == 0:
        return f'{{"safeinfer_mode": "sgds", "safeinfer_lam": {rng.choice(numbers)}}}', "safeinfer_lam"
    if choice == 1:
        value = rng.choice([n for n in numbers if n not in ("0.99999999", "1.0", "-0.5", "1e308")])
        return f'{{"safeinfer_mode": "sa", "safeinfer_gamma": {value}}}', "safeinfer_gamma"
    if choice == 2:
        key = rng.choice(["safeinfer_gamma", "safeinfer_lam"])
        mode = "sa" if key == "safeinfer_gamma" else "sgds"
        return f'{{"safeinfer_mode": "{mode}", "{key}": {rng.choice(wrong)}}}', key
    if choice == 3:
        return f'{{"safeinfer_mode": {rng.choice([*wrong, chr(34) + "strong" + chr(34)])}}}', "safeinfer_mode"
    if choice == 4:
        name = rng.choice(["missing", "../a", "/etc/passwd", "a.safetensors", "A", " a"])
        return json.dumps({"safeinfer_mode": "sa", "safeinfer_vector": name}), "safeinfer_vector"
    if choice == 5:
        key = rng.choice(["safeinfer_strength", "safeinfer_", "safeinfer_Mode", "safeinfer_lam2"])
        return json.dumps({key: 1}), key
    return json.dumps({"safeinfer_mode": "off", "safeinfer_lam": 0.5}), "safeinfer_lam"


VALID = [None, "off", "sgds", "safeinfer"]


def test_500_malformed_requests_interleaved_with_valid_ones(client, server):
    openai, model = client
    base, _ = server
    expected = {mode: openai.completions.create(
        model=model, prompt=[300, 12], max_tokens=4, temperature=0.0,
        extra_body=xargs(mode)).choices[0].text for mode in VALID}
    rng = random.Random(0)
    bad = [malformed(rng) for _ in range(500)]

    async def run() -> list[tuple[int, str, str | None]]:
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(base_url=base, timeout=TIMEOUT_S, limits=limits) as http:
            async def send(body: str, mode_or_key: str | None, valid: bool):
                response = await http.post("/v1/completions", content=body,
                                           headers={"Content-Type": "application/json"})
                return response.status_code, response.text, mode_or_key, valid

            jobs = []
            for i, (raw, key) in enumerate(bad):
                body = (f'{{"model": "{model}", "prompt": [300, 12], "max_tokens": 4, '
                        f'"temperature": 0.0, "vllm_xargs": {raw}}}')
                jobs.append(send(body, key, False))
                if i % 5 == 0:
                    mode = VALID[(i // 5) % len(VALID)]
                    good = {"model": model, "prompt": [300, 12], "max_tokens": 4,
                            "temperature": 0.0, **xargs(mode)}
                    jobs.append(send(json.dumps(good), mode, True))
            return await asyncio.wait_for(asyncio.gather(*jobs), timeout=600)

    results = asyncio.run(run())
    assert len(results) == 600
    for status, text, mode_or_key, valid in results:
        if valid:
            assert status == 200, text
            assert json.loads(text)["choices"][0]["text"] == expected[mode_or_key]
        else:
            assert status == 400, (mode_or_key, text)
            assert mode_or_key in text, (mode_or_key, text)
    assert httpx.get(f"{base}/health", timeout=10).status_code == 200


def test_64_concurrent_mixed_mode_requests_equal_their_solo_outputs(client, server):
    openai, model = client
    base, _ = server
    requests = [([7, 8, 9, 10 + i], [None, *MODES][i % 5], (0.5, 0.7, 0.9)[i % 3])
                for i in range(64)]

    def body(prompt, mode, lam):
        extra = xargs(mode)
        if mode in ("sgds", "safeinfer"):
            extra["vllm_xargs"]["safeinfer_lam"] = lam
        return {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS,
                "temperature": 0.0, **extra}

    solo = [httpx.post(f"{base}/v1/completions", json=body(*r), timeout=TIMEOUT_S)
            .json()["choices"][0]["text"] for r in requests]

    async def run():
        async with httpx.AsyncClient(base_url=base, timeout=TIMEOUT_S) as http:
            responses = await asyncio.wait_for(asyncio.gather(
                *(http.post("/v1/completions", json=body(*r)) for r in requests)), timeout=600)
        return responses

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 64
    assert [r.json()["choices"][0]["text"] for r in responses] == solo


def test_docs_client_examples_run_as_written(client, server):
    """Every client example of README.md and docs/ (the blocks naming BASE: see
    tests/test_docs.py), run as written against this server: bash with BASE and MODEL in
    its environment, Python with them defined before the code."""
    import os
    import subprocess
    import sys

    from tests.test_docs import client_blocks

    base, _ = server
    _, model = client
    environment = {**os.environ, "BASE": base, "MODEL": model}
    blocks = client_blocks()
    assert {b.language for b in blocks} >= {"python", "bash"}
    for block in blocks:
        if block.language == "python":
            command = [sys.executable, "-c", f"BASE = {base!r}\nMODEL = {model!r}\n" + block.text]
        else:
            command = ["bash", "-c", "set -euo pipefail\n" + block.text]
        run = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S,
                             env=environment)
        assert run.returncode == 0, f"{block.where}: {run.stderr}"
        assert '"error"' not in run.stdout, f"{block.where}: {run.stdout}"
        if block.language == "python":
            continue
        answers = [json.loads(line) for line in run.stdout.replace("}{", "}\n{").splitlines()
                   if line.strip()]
        assert answers[0]["choices"][0]["message"]["role"] == "assistant", block.where
        if "/v1/safeinfer/gate/" in block.text:
            assert answers[1]["configured"] is True and answers[1]["defaults"]["mode"] == "sa"
            assert answers[1]["probe"]["layers"] == [0, 1]
            assert answers[1]["probe"]["position"] == "content-mean"
            assert isinstance(answers[2]["flagged"], bool) and answers[2]["defence"] == "sgds"


def scrape(base: str) -> dict[tuple[str, str], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", timeout=10).text
    return {(sample.name, sample.labels.get("mode", "")): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name.startswith("vllm_safeinfer:")}


def test_metrics_count_exactly_what_was_sent(client, server, references):
    """Per-mode requests and tokens, every child of an `n = 2` request included, and the
    mixing metric (counted on the device, read at scrape time) equal to the steps at
    which the reference's mixing changed the greedy token."""
    import time

    openai, model = client
    base, assets = server
    reference = references("tiny-llama")
    before = scrape(base)
    changes = 0
    for mode in MODES:
        for prompt in PROMPTS[:3]:
            # n > 1 needs sampling; top_k 1 keeps it greedy, so the reference applies.
            n = 2 if mode in ("sgds", "safeinfer") and prompt is PROMPTS[1] else 1
            full = openai.completions.create(
                model=model, prompt=prompt, max_tokens=MAX_TOKENS, n=n,
                temperature=1.0 if n > 1 else 0.0,
                extra_body={**xargs(mode), "ignore_eos": True, "return_token_ids": True,
                            "top_k": 1})
            counted: list[int] = []
            want = reference_generate(reference, assets, [prompt], [Case(mode)], MAX_TOKENS,
                                      ignore_eos=True, changes=counted)[0]
            assert [c.model_extra["token_ids"] for c in full.choices] == [want] * n
            changes += n * counted[0]

    def delta(name: str, mode: str = "") -> float:
        return after.get((name, mode), 0.0) - before.get((name, mode), 0.0)

    sent = [3, 3, 4, 4]  # sgds and safeinfer: one request with n = 2
    deadline = time.time() + 30
    while True:  # vLLM records finished-request stats just after answering; the workers'
        after = scrape(base)  # tallies are read at most once per WORKER_READ_INTERVAL_S
        counted = [delta("vllm_safeinfer:requests_total", m) for m in MODES]
        mixed = delta("vllm_safeinfer:mixing_changed_tokens_total")
        if (counted == sent and mixed == changes) or time.time() > deadline:
            break
        time.sleep(0.5)
    assert counted == sent
    assert [delta("vllm_safeinfer:generation_tokens_total", m) for m in MODES] == [
        count * MAX_TOKENS for count in sent]
    assert changes > 0  # the case happened: mixing changed some greedy choices
    assert delta("vllm_safeinfer:mixing_changed_tokens_total") == changes
