"""Publishing safety vectors to a running server: `POST /v1/safeinfer/vectors` loads
`vector_dir/NAME.safetensors` into every worker and the engine core without a restart.
A real `safeinfer serve` subprocess of tiny Llama with an inference key, an admin key and
a vector_dir (run as users run it: no insecure serialization); outputs are compared with
the HF reference steered by the same contents. The parts without an engine (failures,
transit, identities): tests/server/test_operator.py. docs/serving.md's publishing example is run
here as written."""
from __future__ import annotations

import httpx
import pytest
import torch

from tests.conftest import serving
from tests.parity import Case
from vllm_safeinfer.common.vectors import SafetyVector
from vllm_safeinfer.offline.reference import RowSettings

KEY, ADMIN_KEY = "secret", "operator-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
AS_ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
TOKENS = 12


@pytest.fixture(scope="module")
def admin(tiny_assets, tmp_path_factory):
    assets = tiny_assets("tiny-llama")
    folder = tmp_path_factory.mktemp("publish")
    vector_dir = folder / "vectors"
    vector_dir.mkdir()
    config = {"vectors": {"a": assets.vectors["a"]}, "vector_dir": str(vector_dir)}
    with serving(assets.model, config, folder, "--api-key", KEY, "--safeinfer-admin-key",
                 ADMIN_KEY, "--enable-prompt-tokens-details") as base:
        model = httpx.get(f"{base}/v1/models", headers=AUTH, timeout=10).json()["data"][0]["id"]
        yield base, model, assets, vector_dir


def write_vector(assets, path, seed: int, layer: int = 1) -> SafetyVector:
    direction = torch.randn(assets.hidden_size, generator=torch.Generator().manual_seed(seed))
    vector = SafetyVector(vector=direction / direction.norm(), layer=layer, model="tiny-llama",
                          hidden_size=assets.hidden_size, num_layers=4, heads=((layer, 0),),
                          gamma=4.0)
    vector.save(path)
    return vector


def publish(base: str, name, headers=AS_ADMIN) -> httpx.Response:
    return httpx.post(f"{base}/v1/safeinfer/vectors", json={"name": name}, headers=headers,
                      timeout=120)


def complete(base, model, prompt, xargs, max_tokens=TOKENS, headers=AUTH):
    response = httpx.post(f"{base}/v1/completions", headers=headers, timeout=120, json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
        "ignore_eos": True, "return_token_ids": True, "vllm_xargs": xargs})
    return response


def run_docs_example(base: str) -> dict:
    """docs/serving.md's publishing example, run as written (it publishes vector c)."""
    import json
    import os
    import subprocess

    from tests.test_docs import marked_blocks

    [block] = marked_blocks("tests/server/test_publish.py")
    assert block.page.name == "serving.md"
    done = subprocess.run(["bash", "-c", "set -euo pipefail\n" + block.text], timeout=120,
                          capture_output=True, text=True,
                          env={**os.environ, "BASE": base, "ADMIN_KEY": ADMIN_KEY})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def steered(reference, vector: SafetyVector, prompt, max_tokens=TOKENS) -> list[int]:
    settings = RowSettings("sa", vector=vector.vector, layer=vector.layer, gamma=vector.gamma)
    return reference.generate([prompt], [settings], max_tokens, ignore_eos=True)[0]


def test_publishing_needs_the_admin_key_and_a_file_in_the_folder(admin):
    base, model, assets, vector_dir = admin
    write_vector(assets, vector_dir / "c.safetensors", seed=1)
    write_vector(assets, vector_dir / "deep.safetensors", seed=2, layer=3)
    for headers in ({}, {"Authorization": "Bearer wrong"}, AUTH):  # AUTH: the inference key
        assert publish(base, "c", headers=headers).status_code == 401
    assert httpx.get(f"{base}/v1/safeinfer/vectors", headers=AS_ADMIN,
                     timeout=10).status_code == 405
    # Without the key no body is read: bad options get vLLM's 401, not SafeInfer's 400.
    unread = complete(base, model, [5, 6, 7], {"safeinfer_vector": "zz"}, headers={})
    assert unread.status_code == 401 and "loaded" not in unread.text
    for name, message in (("../c", "must match"), ("c.safetensors", "must match"),
                          ("", "must match"), (3, "must match"), ("nope", "does not exist"),
                          ("deep", "layers [3], which this server does not steer")):
        response = publish(base, name)
        assert response.status_code == 400 and message in response.text, (name, response.text)
    refused = complete(base, model, [5, 6, 7], {"safeinfer_mode": "sa", "safeinfer_vector": "c"})
    assert refused.status_code == 400 and "safeinfer_vector" in refused.text
    # This server has no expert: the mixing modes are refused, naming the option.
    for mode in ("sgds", "safeinfer"):
        refused = complete(base, model, [5, 6, 7], {"safeinfer_mode": mode})
        assert refused.status_code == 400 and "needs an expert model" in refused.text


def test_published_and_replaced_vectors_steer_exactly(admin, references):
    base, model, assets, vector_dir = admin
    reference = references("tiny-llama")
    first = write_vector(assets, vector_dir / "c.safetensors", seed=1)
    response = run_docs_example(base)
    assert response["layers"] == [1] and response["default_gamma"] == 4.0
    assert response["version"] == 1 and len(response["sha256"]) == 64
    xargs = {"safeinfer_mode": "sa", "safeinfer_vector": "c"}
    shared = [(11 * i + 7) % 480 + 10 for i in range(70)]
    turn1 = complete(base, model, shared, xargs, max_tokens=40).json()["choices"][0]["token_ids"]
    assert turn1 == steered(reference, first, shared, 40)
    second = write_vector(assets, vector_dir / "c.safetensors", seed=3)
    replaced = publish(base, "c")
    assert replaced.status_code == 200 and replaced.json()["version"] == 2
    assert replaced.json()["sha256"] != response["sha256"]
    follow_up = shared + turn1 + [30, 31, 32]
    answer = complete(base, model, follow_up, xargs).json()
    # Steered by the new contents, and only the 64 plain tokens came from the cache.
    assert answer["choices"][0]["token_ids"] == steered(reference, second, follow_up)
    assert answer["choices"][0]["token_ids"] != steered(reference, first, follow_up)
    assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 64
    shown = httpx.get(f"{base}/v1/safeinfer", headers=AUTH, timeout=10).json()
    assert set(shown["vectors"]) == {"a", "c"}
    plain = complete(base, model, [5, 6, 7], {"safeinfer_mode": "sa"}).json()
    assert plain["choices"][0]["token_ids"] == reference.generate(
        [[5, 6, 7]], [Case("sa").row_settings(assets)], TOKENS, ignore_eos=True)[0]
