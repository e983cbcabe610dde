"""Every door into the engine answers SafeInfer options alike: `safeinfer serve` of tiny
Llama with an API key, its options checked on each generation route vLLM mounts
(`/v1/completions`, `/v1/chat/completions`, `/v1/responses`, `/v1/messages` and
SageMaker's `/invocations`, which vLLM leaves outside its key check), with and without the
key, valid, invalid, and weakening a server that enforces its configuration. No reply to
a client without the key names a vector."""
from __future__ import annotations

import httpx

from tests.conftest import serving

KEY = "door-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SECRET_NAME = "zebra-vector"  # a name no reply to a stranger may contain


def bodies(model: str, xargs: dict) -> dict[str, dict]:
    """One generation request per route, each carrying `xargs`."""
    chat = [{"role": "user", "content": "Hello there"}]
    return {
        "/v1/completions": {"model": model, "prompt": "Hello there", "max_tokens": 4,
                            "vllm_xargs": xargs},
        "/v1/chat/completions": {"model": model, "messages": chat, "max_tokens": 4,
                                 "vllm_xargs": xargs},
        "/v1/responses": {"model": model, "input": "Hello there", "max_output_tokens": 4,
                          "vllm_xargs": xargs},
        "/v1/messages": {"model": model, "messages": chat, "max_tokens": 4,
                         "vllm_xargs": xargs},
        "/invocations": {"model": model, "prompt": "Hello there", "max_tokens": 4,
                         "vllm_xargs": xargs},
    }


def answers(base: str, model: str, xargs: dict, headers: dict) -> dict[str, httpx.Response]:
    return {path: httpx.post(f"{base}{path}", json=body, headers=headers, timeout=120)
            for path, body in bodies(model, xargs).items()}


def served(tiny_assets, tmp_path, **overrides):
    assets = tiny_assets("tiny-llama")
    config = {"vectors": {SECRET_NAME: assets.vectors["a"], "b": assets.vectors["b"]},
              "default_vector": SECRET_NAME, "mode": "sa", **overrides}
    return serving(assets.model, config, tmp_path, "--api-key", KEY)


def model_of(base: str) -> str:
    return httpx.get(f"{base}/v1/models", headers=AUTH, timeout=10).json()["data"][0]["id"]


def test_every_route_answers_options_as_completions_do(tiny_assets, tmp_path):
    with served(tiny_assets, tmp_path) as base:
        model = model_of(base)
        for xargs in ({"safeinfer_vector": "b", "safeinfer_gamma": 2.0},
                      {"safeinfer_vector": SECRET_NAME}):
            for path, response in answers(base, model, xargs, AUTH).items():
                assert response.status_code == 200, (path, response.text)
        for xargs, said in (({"safeinfer_vector": "nope"}, "'nope' is not a loaded vector"),
                            ({"safeinfer_gamma": "strong"}, "safeinfer_gamma"),
                            ({"safeinfer_gamma": True}, "safeinfer_gamma must be a number"),
                            ({"safeinfer_typo": 1}, "safeinfer_typo"),
                            ({"safeinfer_mode": "sgds"}, "needs an expert model")):
            for path, response in answers(base, model, xargs, AUTH).items():
                assert response.status_code == 400, (path, xargs, response.text)
                assert said in response.text, (path, xargs, response.text)
                assert SECRET_NAME not in response.text, (path, xargs)
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            for xargs in ({"safeinfer_vector": "nope"}, {"safeinfer_gamma": True}, {}):
                for path, response in answers(base, model, xargs, headers).items():
                    assert response.status_code == 401, (path, response.text)
                    assert SECRET_NAME not in response.text and "safeinfer" not in response.text
            assert httpx.get(f"{base}/v1/safeinfer", headers=headers,
                             timeout=10).status_code == 401
            assert httpx.post(f"{base}/tokenize", json={"prompt": "x"}, headers=headers,
                              timeout=10).status_code == 401
        shown = httpx.get(f"{base}/v1/safeinfer", headers=AUTH, timeout=10).json()
        assert SECRET_NAME in shown["vectors"]  # behind the key, the operator view names it
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200


def test_enforce_refuses_weakening_on_every_route(tiny_assets, tmp_path):
    with served(tiny_assets, tmp_path, enforce=True) as base:
        model = model_of(base)
        for weakening in ({"safeinfer_mode": "off"}, {"safeinfer_gamma": 0.0}):
            for path, response in answers(base, model, weakening, AUTH).items():
                assert response.status_code == 400, (path, response.text)
                assert "enforces its SafeInfer configuration" in response.text, path
        for path, response in answers(base, model, {}, AUTH).items():
            assert response.status_code == 200, (path, response.text)
