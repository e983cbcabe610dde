"""`safeinfer serve` end to end: vLLM's OpenAI server with the plugin, configured from a
JSON file plus flags; bad per-request options are HTTP 400 and the server keeps serving."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.parity import PROMPTS, Case, reference_generate
from vllm_safeinfer.reference import SafeInferReference

STARTUP_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_assets, tmp_path_factory):
    assets = tiny_assets("tiny-llama")
    config_file = tmp_path_factory.mktemp("server") / "safeinfer.json"
    config_file.write_text(json.dumps(assets.safeinfer_config(mode="off")))
    port = _free_port()
    command = [sys.executable, "-m", "vllm_safeinfer.cli", "serve", assets.model,
               "--safeinfer-config", str(config_file), "--safeinfer-mode", "sa",
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
               "--max-model-len", "512", "--block-size", "32", "--enforce-eager",
               "--max-num-seqs", "8"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + STARTUP_S
    try:
        while True:
            assert process.poll() is None, "the server exited during start-up"
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the server did not start in time"
            time.sleep(1)
        yield base, assets
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


def complete(base: str, prompt: list[int], xargs: dict | None = None) -> httpx.Response:
    body = {"model": None, "prompt": prompt, "max_tokens": 10, "temperature": 0.0,
            "return_token_ids": True}
    if xargs is not None:
        body["vllm_xargs"] = xargs
    models = httpx.get(f"{base}/v1/models", timeout=10).json()
    body["model"] = models["data"][0]["id"]
    return httpx.post(f"{base}/v1/completions", json=body, timeout=120)


def test_server_default_mode_and_request_options(server):
    base, assets = server
    reference = SafeInferReference.from_pretrained(assets.model, assets.expert)
    for case, xargs in ((Case("sa"), None), (Case("sgds", lam=0.9),
                                               {"safeinfer_mode": "sgds", "safeinfer_lam": 0.9})):
        response = complete(base, PROMPTS[0], xargs)
        assert response.status_code == 200, response.text
        got = response.json()["choices"][0]["token_ids"]
        assert got == reference_generate(reference, assets, [PROMPTS[0]], [case])[0]


@pytest.mark.parametrize("xargs,key", [
    ({"safeinfer_gamma": "strong"}, "safeinfer_gamma"),
    ({"safeinfer_vector": "missing"}, "safeinfer_vector"),
    ({"safeinfer_mode": "off", "safeinfer_gamma": 1.0}, "safeinfer_gamma"),
    ({"safeinfer_lam": 1.5, "safeinfer_mode": "sgds"}, "safeinfer_lam"),
    ({"safeinfer_typo": 1}, "safeinfer_typo"),
])
def test_bad_option_is_http_400_and_server_keeps_serving(server, xargs, key):
    base, _ = server
    response = complete(base, PROMPTS[1], xargs)
    assert response.status_code == 400
    assert key in response.text
    assert complete(base, PROMPTS[1]).status_code == 200
