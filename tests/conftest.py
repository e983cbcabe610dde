"""Session-wide setup: environment, the engine pool, tiny-model assets, and the suite's
wall time."""
from __future__ import annotations

import os
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc(callable)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests.engines import EnginePool, make_tiny_assets  # noqa: E402

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
    from vllm_safeinfer.reference import SafeInferReference

    cache = {}

    def get(name: str):
        if name not in cache:
            assets = tiny_assets(name)
            cache[name] = SafeInferReference.from_pretrained(assets.model, assets.expert)
        return cache[name]

    return get


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"suite wall time: {time.time() - _START:.0f} s")


def pytest_collection_modifyitems(config, items):
    """Kernel comparisons run where the kernels can run (see tests/test_kernels.py)."""
    from tests.test_kernels import runs_elsewhere

    elsewhere = [item for item in items
                 if item.module.__name__.endswith("test_kernels") and runs_elsewhere(item.name)]
    if elsewhere:
        config.hook.pytest_deselected(items=elsewhere)
        items[:] = [item for item in items if item not in elsewhere]
