"""`GET /v1/safeinfer` through vLLM's `--middleware` hook: the configuration read-only,
vLLM's API-key rule applied, other paths untouched (a Starlette app with the same state
vLLM's server sets; the live server is checked in tests/server/test_server.py)."""
from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from vllm_safeinfer.common.contract import GATE_DECISIONS, REPORT_METRICS
from vllm_safeinfer.server.http_api import PATH, safeinfer_endpoints


def app_with(assets, api_key=None, **overrides) -> TestClient:
    app = FastAPI()

    @app.get("/v1/models")
    def models():
        return {"data": []}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return {"echo": await request.json()}

    @app.get("/metrics")
    def metrics():
        return "vllm:requests 0"

    app.middleware("http")(safeinfer_endpoints)
    model_config = SimpleNamespace(
        hf_config=argparse.Namespace(hidden_size=assets.hidden_size, num_hidden_layers=4),
        get_hidden_size=lambda: assets.hidden_size)
    app.state.vllm_config = SimpleNamespace(
        additional_config={"safeinfer": assets.safeinfer_config(**overrides)},
        model_config=model_config, parallel_config=SimpleNamespace(data_parallel_size=1))
    app.state.args = argparse.Namespace(api_key=api_key)
    return TestClient(app)


@pytest.fixture()
def assets(tiny_assets):
    return tiny_assets("tiny-llama")


def test_configuration_is_shown_without_paths(assets, monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    client = app_with(assets, mode="safeinfer", lam=0.9)
    response = client.get(PATH)
    assert response.status_code == 200
    assert response.json() == {
        "configured": True,
        "vectors": {"a": {"layers": [1], "steering": "add", "answer_tokens": 0,
                          "default_gamma": 1.0, "relative_dose": None},
                    "b": {"layers": [2], "steering": "add", "answer_tokens": 0,
                          "default_gamma": 1.5, "relative_dose": 0.75},
                    "p": {"layers": [1, 2], "steering": "project", "answer_tokens": 4,
                          "default_gamma": 6.0, "relative_dose": None}},
        "default_vector": "a", "expert": "tiny-llama-expert-v2", "expert_dtype": None,
        "defaults": {"mode": "safeinfer", "gamma": None, "lam": 0.9, "defence": "safeinfer"},
        "probe": {"layers": [0, 1], "position": "content-mean", "normalize": False,
                  "method": "mean-difference", "threshold": assets.harm_probe().threshold,
                  "monitor_threshold": assets.harm_probe().monitor_threshold},
        "enforce": False}
    assert "/" not in response.text.replace(PATH, "")
    assert client.post(PATH).status_code == 405
    assert client.get("/v1/models").json() == {"data": []}


def test_gate_decisions_come_from_the_workers(assets, monkeypatch):
    """`GET /v1/safeinfer/gate/ID` asks the workers (`collective_rpc`) for one request's
    verdict: found, unknown (404), a write (405), and the API key rule."""
    asked = []

    class Engine:
        async def collective_rpc(self, method, args=()):
            asked.append((method, args))
            return [{"chatcmpl-1": {"flagged": True, "score": 0.5, "defence": "sgds"}}]

    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    client = app_with(assets)
    client.app.state.engine_client = Engine()
    found = client.get("/v1/safeinfer/gate/chatcmpl-1")
    assert found.status_code == 200
    assert found.json() == {"id": "chatcmpl-1", "flagged": True, "score": 0.5,
                            "defence": "sgds"}
    assert asked == [(GATE_DECISIONS, (["chatcmpl-1"],))]
    assert client.get("/v1/safeinfer/gate/other").status_code == 404
    assert client.post("/v1/safeinfer/gate/chatcmpl-1").status_code == 405
    keyed = app_with(assets, api_key=["secret"])
    keyed.app.state.engine_client = Engine()
    assert keyed.get("/v1/safeinfer/gate/chatcmpl-1").status_code == 401


def test_scrapes_read_the_workers_at_most_once_per_interval(assets, monkeypatch):
    """However often `/metrics` is scraped, the workers are asked to read their device
    tallies at most once per `WORKER_READ_INTERVAL_S`, and every scrape is answered."""
    import time

    from vllm_safeinfer.server import http_api

    asked = []

    class Engine:
        async def collective_rpc(self, method, args=()):
            asked.append(method)

    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    monkeypatch.setattr(http_api, "WORKER_READ_INTERVAL_S", 0.5)
    client = app_with(assets)
    client.app.state.engine_client = Engine()
    started = time.monotonic()
    answers = [client.get("/metrics") for _ in range(20)]
    assert time.monotonic() - started < 0.5  # all within one interval
    assert [a.status_code for a in answers] == [200] * 20
    assert asked == [REPORT_METRICS]
    time.sleep(0.5)
    client.get("/metrics")
    assert asked == [REPORT_METRICS] * 2


def test_the_api_key_is_required_when_set(assets):
    client = app_with(assets, api_key=["secret"])
    assert client.get(PATH).status_code == 401
    assert client.get(PATH, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get(PATH, headers={"Authorization": "Bearer secret"}).status_code == 200


def test_options_are_validated_as_the_client_wrote_them(assets, monkeypatch):
    """vLLM's request model turns `true` into 1; the middleware sees the raw JSON first."""
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    client = app_with(assets, mode="off")
    refused = client.post("/v1/completions", json={
        "prompt": "x", "vllm_xargs": {"safeinfer_mode": "sa", "safeinfer_gamma": True}})
    assert refused.status_code == 400
    assert refused.json()["error"]["message"] == "safeinfer_gamma must be a number, got bool True"
    body = {"prompt": "x", "vllm_xargs": {"safeinfer_mode": "sa", "safeinfer_gamma": 0.5}}
    passed = client.post("/v1/completions", json=body)
    assert passed.status_code == 200 and passed.json() == {"echo": body}
