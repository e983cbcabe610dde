"""`safeinfer serve` end to end: vLLM's OpenAI server with the plugin, configured from a
JSON file plus flags; bad per-request options are HTTP 400 and the server keeps serving."""
from __future__ import annotations

import httpx
import pytest

from tests.parity import PROMPTS, Case, reference_generate
from vllm_safeinfer.offline.reference import SafeInferReference


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


def test_publishing_is_off_without_an_admin_key(server):
    """The session's server has no admin key: publishing is refused, saying how to turn
    it on, and the server keeps serving."""
    base, _ = server
    refused = httpx.post(f"{base}/v1/safeinfer/vectors", json={"name": "a"}, timeout=30)
    assert refused.status_code == 403 and "--safeinfer-admin-key" in refused.text
    assert complete(base, PROMPTS[1]).status_code == 200


def test_the_server_runs_without_insecure_serialization(server):
    """Everything SafeInfer sends between its processes (vector bytes, verdicts, metric
    reads) goes through vLLM's safe serialization: the server under test runs without
    VLLM_ALLOW_INSECURE_SERIALIZATION, which this test process has set."""
    import os
    from pathlib import Path

    assert os.environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION") == "1"
    base, _ = server
    port = base.rsplit(":", 1)[1].encode()
    servers = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"vllm.entrypoints.openai.api_server" in argv and port in argv:
            servers.append(any(v.startswith(b"VLLM_ALLOW_INSECURE_SERIALIZATION=")
                               for v in environ))
    assert servers == [False]
