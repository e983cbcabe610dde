"""Session-wide setup: environment, the engine pool, tiny-model assets, and the suite's
wall time."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# In-process engines only: tests read worker state with collective_rpc(callable). Servers
# run as users run them, without it (`running_server` drops it).
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests.engines import EnginePool, make_tiny_assets  # noqa: E402
from vllm_safeinfer.server_process import free_port, running_server  # noqa: E402

_START = time.time()


@pytest.fixture(scope="session")
def engine_pool():
    pool = EnginePool()
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-assets")
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = make_tiny_assets(name, folder)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def references(tiny_assets):
    """The HF reference (ground truth) of a tiny model with its expert."""
    from vllm_safeinfer.offline.reference import SafeInferReference

    cache = {}

    def get(name: str):
        if name not in cache:
            assets = tiny_assets(name)
            cache[name] = SafeInferReference.from_pretrained(assets.model, assets.expert)
        return cache[name]

    return get


STARTUP_S = 300


@contextlib.contextmanager
def serving(model: str, config: dict, folder, *flags: str):
    """`safeinfer serve` as a real subprocess on 127.0.0.1 with `config` as its
    `--safeinfer-config` file; yields the base URL once /health answers."""
    config_file = folder / "safeinfer.json"
    config_file.write_text(json.dumps(config))
    port = free_port()
    command = [sys.executable, "-m", "vllm_safeinfer.cli", "serve", model,
               "--safeinfer-config", str(config_file), *flags,
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
               "--max-model-len", "512", "--block-size", "32", "--enforce-eager",
               "--max-num-seqs", "8"]
    with running_server(command, port, folder / "server.log", timeout_s=STARTUP_S) as base:
        yield base


@pytest.fixture(scope="session")
def server(tiny_assets, tmp_path_factory):
    """`safeinfer serve` of tiny-llama with its expert, default mode `sa`: (base URL,
    assets)."""
    assets = tiny_assets("tiny-llama")
    with serving(assets.model, assets.safeinfer_config(mode="off"),
                 tmp_path_factory.mktemp("server"), "--safeinfer-mode", "sa") as base:
        yield base, assets


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session (2 CPUs: this machine's)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"suite wall time: {time.time() - _START:.0f} s")


def pytest_collection_modifyitems(config, items):
    """Kernel comparisons run where the kernels can run (see tests/kernels/test_kernels.py)."""
    from tests.kernels.test_kernels import runs_elsewhere

    elsewhere = [item for item in items
                 if item.module.__name__.endswith("test_kernels") and runs_elsewhere(item.name)]
    if elsewhere:
        config.hook.pytest_deselected(items=elsewhere)
        items[:] = [item for item in items if item not in elsewhere]
