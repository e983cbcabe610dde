"""The operator surface without an engine: who may publish a vector, what an
unauthenticated client can learn, and publishing as one read, one identity, all or
nothing. The app is a Starlette app with vLLM's own authentication middleware inside
SafeInfer's (the order vLLM's server adds them in); the engine processes are the real
worker and engine-core functions on real tables (two tensor-parallel ranks), reached
through a fake engine client. The live server is exercised in tests/server/test_publish.py."""
from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

from tests.server.test_publish import write_vector
from vllm_safeinfer.common.config import SafeInferConfig
from vllm_safeinfer.common.vector_table import RELOAD_SLOTS, VectorTable
from vllm_safeinfer.common.vectors import SafetyVector, content_sha256
from vllm_safeinfer.engine.batch_state import BatchState
from vllm_safeinfer.common.contract import (
    PUBLISH_VECTOR,
    STAGE_VECTOR,
    TAKE_BACK_VECTOR,
    Stamp,
)
from vllm_safeinfer.common.modes import Mode
from vllm_safeinfer.common.request_options import resolve_request
from vllm_safeinfer.common.vector_files import identify
from vllm_safeinfer.engine.prefix_cache import EngineCoreState
from vllm_safeinfer.engine.publishing import StagedVector, stage_vector, take_back_vector
from vllm_safeinfer.server.http_api import (
    ADMIN_KEY_ENV,
    MAX_BODY_BYTES,
    VECTORS_PATH,
    safeinfer_endpoints,
)

ADMIN, INFERENCE = "operator-secret", "client-secret"
# Routes that reach the engine: under vLLM's key-guarded prefixes, and outside them.
ENGINE_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages",
                 "/invocations", "/generative_scoring", "/tokenize")
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}


class _ModelConfig:
    def __init__(self, hidden: int) -> None:
        self.hf_config = argparse.Namespace(hidden_size=hidden, num_hidden_layers=4)
        self.model = "tiny-llama"

    def get_hidden_size(self) -> int:
        return self.hf_config.hidden_size


class Engine:
    """vLLM's engine client as the API server sees it: `collective_rpc` reaches every
    worker (here two ranks), `engine_core.call_utility_async` the engine core. `deliver`
    may alter what a rank receives (a file swapped, bytes changed in transit)."""

    def __init__(self, config: SafeInferConfig, model_config, ranks: int = 2) -> None:
        config = identify(config)
        self.workers = [SimpleNamespace(
            staged=None,
            state=BatchState(VectorTable(config, model_config), 4, torch.device("cpu"), False))
            for _ in range(ranks)]
        self.core = EngineCoreState(config)
        self.engine_core = SimpleNamespace(call_utility_async=self._utility)
        self.input_processor = SimpleNamespace(_safeinfer_config=config)
        self.deliver = lambda rank, args: args
        self.core_fails = False

    async def collective_rpc(self, method: str, args=()):
        results = []
        for rank, worker in enumerate(self.workers):
            if method == STAGE_VECTOR:
                name, where, data, sha256 = self.deliver(rank, args)
                results.append(stage_vector(worker, name, where, data, sha256))
            elif method == TAKE_BACK_VECTOR:
                results.append(take_back_vector(worker, *args))
            else:
                raise AssertionError(method)
        return results

    async def _utility(self, method: str, *args):
        assert method == PUBLISH_VECTOR
        if self.core_fails:
            raise RuntimeError("engine core down")
        self.core.publish(*args)

    def steering_row(self, rank: int, name: str) -> torch.Tensor:
        """The vector a new request naming `name` steers with on `rank`: the row of the
        identity the engine core stamps."""
        request = SimpleNamespace(
            request_id="r", sampling_params=SimpleNamespace(
                extra_args={"safeinfer_mode": "sa", "safeinfer_vector": name}))
        self.core.stamp(request)
        state = self.workers[rank].state
        entry = state.vectors.row(Stamp.of(request.sampling_params.extra_args).vector_sha256)
        return state.vector_table[entry.index]


@pytest.fixture()
def published(tiny_assets, tmp_path, monkeypatch):
    """(client, engine, vector_dir, assets): a server with vector_dir, the admin key set
    and an inference key."""
    monkeypatch.setenv(ADMIN_KEY_ENV, ADMIN)
    assets = tiny_assets("tiny-llama")
    vector_dir = tmp_path / "vectors"
    vector_dir.mkdir()
    client, engine = app_with(assets, {"vector_dir": str(vector_dir)}, api_key=[INFERENCE])
    return client, engine, vector_dir, assets


def app_with(assets, overrides: dict, api_key=None, api_server_count: int = 1):
    app = FastAPI()

    async def echo(request: Request):
        return {"echo": await request.json()}

    for path in ENGINE_ROUTES:
        app.post(path)(echo)
    app.get("/health")(lambda: {})
    if api_key:
        app.add_middleware(AuthenticationMiddleware, tokens=api_key)
    app.middleware("http")(safeinfer_endpoints)
    model_config = _ModelConfig(assets.hidden_size)
    raw = {"vectors": {"a": assets.vectors["a"]}, "default_vector": "a", **overrides}
    app.state.vllm_config = SimpleNamespace(
        additional_config={"safeinfer": raw}, model_config=model_config,
        parallel_config=SimpleNamespace(data_parallel_size=1))
    app.state.args = argparse.Namespace(api_key=api_key, api_server_count=api_server_count)
    engine = Engine(SafeInferConfig.from_dict(raw), model_config)
    app.state.engine_client = engine
    return TestClient(app), engine


def publish(client, name="c", headers=AS_ADMIN, **kwargs):
    return client.post(VECTORS_PATH, json={"name": name}, headers=headers, **kwargs)


def test_publishing_is_refused_without_an_admin_key_whatever_vector_dir_says(
        tiny_assets, tmp_path, monkeypatch):
    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assets = tiny_assets("tiny-llama")
    write_vector(assets, tmp_path / "c.safetensors", seed=1)
    client, engine = app_with(assets, {"vector_dir": str(tmp_path)})
    for headers in ({}, AS_ADMIN):
        refused = publish(client, headers=headers)
        assert refused.status_code == 403
        assert "--safeinfer-admin-key" in refused.text and ADMIN_KEY_ENV in refused.text
    assert engine.core.vectors.keys() == {"a"}


def test_the_inference_key_cannot_publish(published, monkeypatch):
    client, engine, vector_dir, assets = published
    write_vector(assets, vector_dir / "c.safetensors", seed=1)
    for headers in ({}, {"Authorization": f"Bearer {INFERENCE}"},
                    {"Authorization": "Bearer wrong"}):
        assert publish(client, headers=headers).status_code == 401
    monkeypatch.setenv(ADMIN_KEY_ENV, INFERENCE)
    same = publish(client, headers={"Authorization": f"Bearer {INFERENCE}"})
    assert same.status_code == 403 and "must differ from the inference key" in same.text
    assert engine.core.vectors.keys() == {"a"}
    monkeypatch.setenv(ADMIN_KEY_ENV, ADMIN)
    assert publish(client).status_code == 200 and engine.core.vectors.keys() == {"a", "c"}


def test_unauthenticated_bodies_are_never_read(published):
    """Without the key, a generation request with bad options and a publish with a body
    too large or not JSON get 401: no validation message, no size check."""
    client, _, _, _ = published
    bad = {"prompt": "x", "vllm_xargs": {"safeinfer_mode": "sa", "safeinfer_vector": "zz"}}
    for headers in ({}, {"Authorization": "Bearer wrong"}, AS_ADMIN):
        answer = client.post("/v1/completions", json=bad, headers=headers)
        assert answer.status_code == 401 and "safeinfer" not in answer.text
    as_client = {"Authorization": f"Bearer {INFERENCE}"}
    typed = {"prompt": "x", "vllm_xargs": {"safeinfer_mode": "sa", "safeinfer_gamma": True}}
    validated = client.post("/v1/completions", json=typed, headers=as_client)
    assert validated.status_code == 400 and "safeinfer_gamma must be a number" in validated.text
    huge = b"x" * (MAX_BODY_BYTES + 1)
    assert client.post(VECTORS_PATH, content=huge).status_code == 401
    assert client.post(VECTORS_PATH, content=b"{not json").status_code == 401
    assert client.post(VECTORS_PATH, content=huge, headers=AS_ADMIN).status_code == 413


def test_a_file_swapped_after_the_check_is_never_served(published):
    """The frontend reads the file once; what reaches every rank is those bytes, so a
    file rewritten while the workers load it changes nothing."""
    client, engine, vector_dir, assets = published
    checked = write_vector(assets, vector_dir / "c.safetensors", seed=1)

    def swap_then_deliver(rank, args):
        write_vector(assets, vector_dir / "c.safetensors", seed=2)
        return args

    engine.deliver = swap_then_deliver
    answer = publish(client)
    assert answer.status_code == 200, answer.text
    on_disk = SafetyVector.load(vector_dir / "c.safetensors")
    assert not torch.equal(on_disk.vector, checked.vector)  # the swap happened
    for rank in range(2):
        assert torch.equal(engine.steering_row(rank, "c"), checked.vector)
    assert answer.json()["sha256"] == engine.core.vectors["c"]


def test_bytes_changed_in_transit_are_refused_and_nothing_changes(published):
    """Rank 1 receives other bytes than the frontend checked: it refuses them, rank 0's
    staged row is taken back, the engine core never switches, no slot stays used; the
    next publication works."""
    client, engine, vector_dir, assets = published
    first = write_vector(assets, vector_dir / "c.safetensors", seed=1)
    assert publish(client).status_code == 200
    replacement = write_vector(assets, vector_dir / "c.safetensors", seed=3)
    identity_before = engine.core.vectors["c"]
    used_before = [w.state.vectors.rows_used for w in engine.workers]

    def corrupt_rank_1(rank, args):
        name, where, data, sha256 = args
        return (name, where, data[:-4] + b"\0\0\0\0", sha256) if rank == 1 else args

    engine.deliver = corrupt_rank_1
    failed = publish(client)
    assert failed.status_code == 500
    assert "a worker refused it" in failed.text and "contents other than" in failed.text
    assert engine.core.vectors["c"] == identity_before
    assert [w.state.vectors.rows_used for w in engine.workers] == used_before
    for rank in range(2):
        assert torch.equal(engine.steering_row(rank, "c"), first.vector)
    engine.deliver = lambda rank, args: args
    engine.core_fails = True
    failed = publish(client)
    assert failed.status_code == 500 and "the engine core refused it" in failed.text
    assert [w.state.vectors.rows_used for w in engine.workers] == used_before
    engine.core_fails = False
    again = publish(client)
    assert again.status_code == 200 and again.json()["version"] == 2
    for rank in range(2):
        assert torch.equal(engine.steering_row(rank, "c"), replacement.vector)
    assert client.get("/v1/safeinfer", headers={"Authorization": f"Bearer {INFERENCE}"}
                      ).json()["vectors"].keys() == {"a", "c"}


def test_a_failed_first_publication_leaves_no_name_and_no_slot(published):
    client, engine, vector_dir, assets = published
    write_vector(assets, vector_dir / "c.safetensors", seed=1)
    engine.core_fails = True
    assert publish(client).status_code == 500
    assert [w.state.vectors.by_sha256.keys() for w in engine.workers] == [
        {engine.core.vectors["a"]}] * 2
    assert [w.state.vectors.rows_used for w in engine.workers] == [1, 1]
    with pytest.raises(ValueError, match="'c' is not a loaded vector"):
        resolve_request({"safeinfer_vector": "c"}, engine.input_processor._safeinfer_config)


def test_republishing_the_same_contents_takes_no_slot(published):
    client, engine, vector_dir, assets = published
    write_vector(assets, vector_dir / "c.safetensors", seed=1)
    for version in (1, 2, 3):
        assert publish(client).json()["version"] == version
    assert [w.state.vectors.rows_used for w in engine.workers] == [2, 2]
    (vector_dir / "d.safetensors").write_bytes((vector_dir / "c.safetensors").read_bytes())
    assert publish(client, "d").json()["sha256"] == engine.core.vectors["c"]
    assert [w.state.vectors.rows_used for w in engine.workers] == [2, 2]
    for seed in range(10, 10 + RELOAD_SLOTS - 1):
        write_vector(assets, vector_dir / "c.safetensors", seed=seed)
        assert publish(client).status_code == 200
    write_vector(assets, vector_dir / "c.safetensors", seed=99)
    full = publish(client)
    assert full.status_code == 400 and "slots for published vectors are used" in full.text


def test_two_api_servers_never_share_identity_for_different_contents(tiny_assets, tmp_path,
                                                                     monkeypatch):
    """Two servers (or one restarted) publish under one name: different contents get
    different cache keys, the same contents the same key, whatever the version count."""
    monkeypatch.setenv(ADMIN_KEY_ENV, ADMIN)
    assets = tiny_assets("tiny-llama")
    keys, files = {}, {}
    for server, seeds in (("one", (1, 2)), ("two", (2,))):
        folder = tmp_path / server
        folder.mkdir()
        client, engine = app_with(assets, {"vector_dir": str(folder)})
        for seed in seeds:
            if seed not in files:  # the same file (bytes) published on both servers
                write_vector(assets, tmp_path / f"{seed}.safetensors", seed=seed)
                files[seed] = (tmp_path / f"{seed}.safetensors").read_bytes()
            (folder / "c.safetensors").write_bytes(files[seed])
            assert publish(client).status_code == 200
            request = SimpleNamespace(request_id="r", sampling_params=SimpleNamespace(
                extra_args={"safeinfer_mode": "sa", "safeinfer_vector": "c"}))
            engine.core.stamp(request)
            keys[(server, seed)] = Stamp.of(request.sampling_params.extra_args).kv_key
    assert keys[("one", 1)] != keys[("one", 2)]
    assert keys[("one", 2)] == keys[("two", 2)]  # version 2 on one, 1 on two: same bytes


def test_several_api_servers_refuse_publishing(published, tiny_assets, tmp_path):
    _, _, vector_dir, assets = published
    write_vector(assets, vector_dir / "c.safetensors", seed=1)
    client, engine = app_with(assets, {"vector_dir": str(vector_dir)}, api_server_count=2)
    refused = publish(client)
    assert refused.status_code == 409 and "--api-server-count 1" in refused.text
    assert engine.core.vectors.keys() == {"a"}


def test_the_worker_refuses_bytes_whose_hash_differs(tiny_assets):
    """The check that makes the transit test above fail, on its own."""
    assets = tiny_assets("tiny-llama")
    config = SafeInferConfig.from_dict({"vectors": {"a": assets.vectors["a"]},
                                        "vector_dir": str(Path(assets.vectors["a"]).parent)})
    engine = Engine(config, _ModelConfig(assets.hidden_size), ranks=1)
    data = Path(assets.vectors["b"]).read_bytes()
    with pytest.raises(ValueError, match="contents other than the frontend checked"):
        asyncio.run(engine.collective_rpc(STAGE_VECTOR,
                                          ("b", "b", data, "0" * 64)))
    worker = engine.workers[0]
    assert worker.staged is None
    assert worker.state.vectors.rows_used == 1


def test_serve_refuses_an_admin_key_equal_to_the_inference_key(capsys):
    from vllm_safeinfer.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "model", "--safeinfer-mode", "off", "--safeinfer-admin-key", "k",
              "--api-key", "k"])
    assert exit_.value.code == 2
    assert "--safeinfer-admin-key must differ from --api-key" in capsys.readouterr().err


def test_a_stamp_of_contents_never_loaded_is_refused_not_served_by_name(tiny_assets):
    """No fallback to the name's row: contents and identity never disagree."""
    assets = tiny_assets("tiny-llama")
    config = SafeInferConfig.from_dict({"vectors": {"a": assets.vectors["a"]}})
    table = VectorTable(config, _ModelConfig(assets.hidden_size))
    with pytest.raises(RuntimeError, match="never loaded"):
        table.row("f" * 64)
    assert table.row(table.entries["a"].sha256) == table.entries["a"]


def test_every_route_needs_the_key_and_gets_the_same_type_check(published):
    """With an API key, a route vLLM leaves unguarded (`/invocations`, ...) answers 401
    without it, its body unread, as vLLM answers on its own prefixes; liveness stays open.
    With the key, every JSON route has its raw option types checked alike."""
    client, _, _, _ = published
    typed = {"prompt": "x", "vllm_xargs": {"safeinfer_mode": "sa", "safeinfer_lam": True}}
    plain = {"prompt": "x", "vllm_xargs": {"safeinfer_mode": "sa"}}
    as_client = {"Authorization": f"Bearer {INFERENCE}"}
    for path in ENGINE_ROUTES:
        for headers in ({}, {"Authorization": "Bearer wrong"}, AS_ADMIN):
            refused = client.post(path, json=typed, headers=headers)
            assert refused.status_code == 401, path
            assert "safeinfer" not in refused.text and "echo" not in refused.text, path
        checked = client.post(path, json=typed, headers=as_client)
        assert checked.status_code == 400, path
        assert "safeinfer_lam must be a number, got bool True" in checked.text, path
        passed = client.post(path, json=plain, headers=as_client)
        assert passed.status_code == 200 and passed.json() == {"echo": plain}, path
    assert client.get("/health").status_code == 200


def test_a_worker_failing_to_stage_leaves_every_process_as_it_was(published):
    """A failure injected in rank 1 after rank 0 staged: the client gets an error, the
    name resolves to its old contents everywhere, and no row stays taken."""
    client, engine, vector_dir, assets = published
    first = write_vector(assets, vector_dir / "c.safetensors", seed=1)
    assert publish(client).status_code == 200
    write_vector(assets, vector_dir / "c.safetensors", seed=2)
    identity, used = engine.core.vectors["c"], [w.state.vectors.rows_used for w in engine.workers]

    def fail_on_rank_1(rank, args):
        if rank == 1:
            raise RuntimeError("injected: rank 1 is out of memory")
        return args

    engine.deliver = fail_on_rank_1
    failed = publish(client)
    assert failed.status_code == 500 and "injected" in failed.text
    assert engine.core.vectors["c"] == identity
    assert [w.state.vectors.rows_used for w in engine.workers] == used
    for rank in range(2):
        assert torch.equal(engine.steering_row(rank, "c"), first.vector)
    assert client.get("/v1/safeinfer", headers={"Authorization": f"Bearer {INFERENCE}"}
                      ).json()["vectors"]["c"] == publish_description(engine, "c")


def publish_description(engine, name: str) -> dict:
    """What rank 0 knows of the contents the engine core stamps for `name`."""
    return engine.workers[0].state.vectors.row(engine.core.vectors[name]).describe()


def test_a_row_in_use_is_never_taken_back(published):
    """Taking a publication back refuses while a running row steers with its row."""
    _, engine, vector_dir, assets = published
    vector = write_vector(assets, vector_dir / "c.safetensors", seed=1)
    data = (vector_dir / "c.safetensors").read_bytes()
    sha256 = content_sha256(data)
    worker = engine.workers[0]
    stage_vector(worker, "c", "c", data, sha256)
    worker.state.set_row(0, Stamp("r", Mode.SA, Mode.SA, vector_sha256=sha256), prompt_len=3)
    with pytest.raises(RuntimeError, match="in use by a running request"):
        take_back_vector(worker, sha256)
    row = worker.state.vectors.row(sha256).index
    assert torch.equal(worker.state.vector_table[row], vector.vector)
    worker.state.clear_row(0)
    worker.staged = StagedVector(sha256, took_row=True)
    take_back_vector(worker, sha256)
    assert sha256 not in worker.state.vectors.by_sha256


REWRITTEN_SCRIPT = """
import sys
from types import SimpleNamespace
from vllm_safeinfer.common.config import SafeInferConfig
from vllm_safeinfer.common.vector_table import VectorTable
config = SafeInferConfig.from_dict({"vectors": {"v": sys.argv[1]}}).with_identities(
    {"v": sys.argv[2]})
model_config = SimpleNamespace(hf_config=SimpleNamespace(num_hidden_layers=4),
                               get_hidden_size=lambda: int(sys.argv[3]), model="tiny-llama")
table = VectorTable(config, model_config)
print(table.entries["v"].sha256)
"""


def test_a_vector_rewritten_between_start_ups_never_steers_under_the_old_identity(
        tiny_assets, tmp_path):
    """The API server reads the file once; a process that starts after the file was
    rewritten (a worker: the script builds its table as one does) refuses to start, and
    one holding the bytes already keeps steering them under their identity."""
    assets = tiny_assets("tiny-llama")
    path = tmp_path / "v.safetensors"
    read = write_vector(assets, path, seed=1)
    config = identify(SafeInferConfig.from_dict({"vectors": {"v": str(path)}}))
    sha256 = config.vector_sha256["v"]
    original = path.read_bytes()
    write_vector(assets, path, seed=2)

    def start(sha: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", REWRITTEN_SCRIPT, str(path), sha,
                               str(assets.hidden_size)], capture_output=True, text=True,
                              timeout=120)

    refused = start(sha256)
    assert refused.returncode != 0 and "changed after the API server read it" in refused.stderr
    table = VectorTable(config, _ModelConfig(assets.hidden_size))  # this process holds them
    assert table.entries["v"].sha256 == sha256
    assert torch.equal(table.table[0], read.vector)
    path.write_bytes(original)
    started = start(sha256)
    assert started.returncode == 0 and started.stdout.split()[-1] == sha256, started.stderr
