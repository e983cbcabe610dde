"""Publishing safety vectors to a running server: `POST /v1/safeinfer/vectors` loads
`vector_dir/NAME.safetensors` into every worker and the engine core without a restart.
A real `safeinfer serve` subprocess of tiny Llama with an API key and a vector_dir;
outputs are compared with the HF reference steered by the same contents."""
from __future__ import annotations

import httpx
import pytest
import torch

from tests.conftest import serving
from tests.parity import Case
from vllm_safeinfer.reference import RowSettings
from vllm_safeinfer.vectors import SafetyVector

KEY = "secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
TOKENS = 12


@pytest.fixture(scope="module")
def admin(tiny_assets, tmp_path_factory):
    assets = tiny_assets("tiny-llama")
    folder = tmp_path_factory.mktemp("publish")
    vector_dir = folder / "vectors"
    vector_dir.mkdir()
    config = {"vectors": {"a": assets.vectors["a"]}, "vector_dir": str(vector_dir)}
    with serving(assets.model, config, folder, "--api-key", KEY,
                 "--enable-prompt-tokens-details") as base:
        model = httpx.get(f"{base}/v1/models", headers=AUTH, timeout=10).json()["data"][0]["id"]
        yield base, model, assets, vector_dir


def write_vector(assets, path, seed: int, layer: int = 1) -> SafetyVector:
    direction = torch.randn(assets.hidden_size, generator=torch.Generator().manual_seed(seed))
    vector = SafetyVector(vector=direction / direction.norm(), layer=layer, model="tiny-llama",
                          hidden_size=assets.hidden_size, num_layers=4, heads=((layer, 0),),
                          gamma=4.0)
    vector.save(path)
    return vector


def publish(base: str, name, headers=AUTH) -> httpx.Response:
    return httpx.post(f"{base}/v1/safeinfer/vectors", json={"name": name}, headers=headers,
                      timeout=120)


def complete(base, model, prompt, xargs, max_tokens=TOKENS):
    response = httpx.post(f"{base}/v1/completions", headers=AUTH, timeout=120, json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
        "ignore_eos": True, "return_token_ids": True, "vllm_xargs": xargs})
    return response


def steered(reference, vector: SafetyVector, prompt, max_tokens=TOKENS) -> list[int]:
    settings = RowSettings("sa", vector=vector.vector, layer=vector.layer, gamma=vector.gamma)
    return reference.generate([prompt], [settings], max_tokens, ignore_eos=True)[0]


def test_publishing_needs_the_key_and_a_file_in_the_folder(admin):
    base, model, assets, vector_dir = admin
    write_vector(assets, vector_dir / "c.safetensors", seed=1)
    write_vector(assets, vector_dir / "deep.safetensors", seed=2, layer=3)
    assert publish(base, "c", headers={}).status_code == 401
    assert publish(base, "c", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{base}/v1/safeinfer/vectors", headers=AUTH, timeout=10).status_code == 405
    for name, message in (("../c", "must match"), ("c.safetensors", "must match"),
                          ("", "must match"), (3, "must match"), ("nope", "does not exist"),
                          ("deep", "layer 3, which this server does not steer")):
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
    response = publish(base, "c")
    assert response.status_code == 200, response.text
    assert response.json()["layer"] == 1 and response.json()["default_gamma"] == 4.0
    xargs = {"safeinfer_mode": "sa", "safeinfer_vector": "c"}
    shared = [(11 * i + 7) % 480 + 10 for i in range(70)]
    turn1 = complete(base, model, shared, xargs, max_tokens=40).json()["choices"][0]["token_ids"]
    assert turn1 == steered(reference, first, shared, 40)
    second = write_vector(assets, vector_dir / "c.safetensors", seed=3)
    replaced = publish(base, "c")
    assert replaced.status_code == 200 and replaced.json()["version"] == 2
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
