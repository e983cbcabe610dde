"""Plugin wiring that needs no engine: processor activation, start-up refusals."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_safeinfer.common.compat import (
    check_supported,
    check_vllm_internals,
    fit_fused_expert,
    supported_vllm_range,
)
from vllm_safeinfer.engine.logits_processor import FQCN, SafeInferLogitsProcessor
from vllm_safeinfer.engine.worker import find_logits_processor
from vllm_safeinfer.plugin import register, with_processor


def test_processor_is_added_once():
    assert with_processor(None) == [FQCN]
    assert with_processor(["other.module:Proc"]) == ["other.module:Proc", FQCN]
    for named in (FQCN, "vllm_safeinfer.engine.logits_processor:SafeInferLogitsProcessor",
                  SafeInferLogitsProcessor):
        assert with_processor([named]) == [named]


def test_missing_processor_stops_the_worker():
    runner = SimpleNamespace(input_batch=SimpleNamespace(logitsprocs=SimpleNamespace(all=())))
    with pytest.raises(RuntimeError, match="logits processor .* is not active"):
        find_logits_processor(runner)


def _vllm_config(**overrides):
    model = SimpleNamespace(runner_type="generate", is_multimodal_model=False,
                            enable_prompt_embeds=False)
    parallel = SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1)
    config = SimpleNamespace(model_config=model, parallel_config=parallel, speculative_config=None)
    for path, value in overrides.items():
        obj, attr = path.split(".") if "." in path else (None, path)
        setattr(getattr(config, obj) if obj else config, attr, value)
    return config


@pytest.mark.parametrize("overrides,message", [
    ({"model_config.runner_type": "pooling"}, "pooling model"),
    ({"speculative_config": object()}, "speculative decoding"),
    ({"parallel_config.pipeline_parallel_size": 2}, "pipeline parallelism"),
    ({"model_config.is_multimodal_model": True}, "multimodal"),
    ({"model_config.enable_prompt_embeds": True}, "prompt embeddings"),
])
def test_unsupported_features_are_refused(overrides, message):
    check_supported(_vllm_config())
    check_supported(_vllm_config(**{"parallel_config.tensor_parallel_size": 2}))
    with pytest.raises(ValueError, match=message):
        check_supported(_vllm_config(**overrides))


def test_a_fused_expert_runs_without_cuda_graphs():
    """CUDA graphs are captured per token count; an expert sharing the served weights
    adds rows to the forward, so its engine runs without them (an expert of its own, or
    none, leaves them on)."""
    from vllm.config import CompilationConfig, CUDAGraphMode

    for shares, expected in ((True, CUDAGraphMode.NONE), (False, CUDAGraphMode.PIECEWISE)):
        config = SimpleNamespace(compilation_config=CompilationConfig(
            cudagraph_mode=CUDAGraphMode.PIECEWISE))
        fit_fused_expert(config, shares)
        assert config.compilation_config.cudagraph_mode == expected


def test_self_check_and_idempotent_register():
    check_vllm_internals()
    assert supported_vllm_range() == "vllm<0.33,>=0.32.0"  # setup.py's one pin
    from vllm.engine.arg_utils import EngineArgs

    register()
    hooked = EngineArgs.create_engine_config
    register()
    assert EngineArgs.create_engine_config is hooked


def test_every_block_hash_caller_sees_the_steering_key():
    """The steering key joins block hashes inside `generate_block_hash_extra_keys`
    itself, so the copies imported by the block pool and by the KV offloading manager
    (vLLM's CPU build cannot run offloading: it is a GPU feature) hash alike."""
    from vllm.v1.core import block_pool, kv_cache_utils
    from vllm.v1.simple_kv_offload import manager

    from vllm_safeinfer.common.contract import STAMP_ARG, Stamp
    from vllm_safeinfer.common.modes import Mode

    register()
    stamp = Stamp("r", Mode.SA, Mode.SA, vector_sha256="0" * 64, kv_key="k")
    request = SimpleNamespace(
        sampling_params=SimpleNamespace(extra_args={STAMP_ARG: stamp.to_args()}), num_prompt_tokens=10,
        prompt_embeds=None, lora_request=None, cache_salt=None, mm_features=[])
    for module in (kv_cache_utils, block_pool, manager):
        hash_keys = module.generate_block_hash_extra_keys
        assert hash_keys(request, 0, 32, 0) == ((("safeinfer", "k", 9),), 0), module.__name__
        assert hash_keys(request, 0, 8, 0) == (None, 0), module.__name__


GUARD_SCRIPT = """
import json, sys
from vllm_safeinfer import plugin
from vllm_safeinfer.common import compat
compat.REQUIRED_INTERNALS += (("vllm.v1.core.kv_cache_utils", "renamed_in_a_future_vllm"),)
plugin.register()
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.engine.input_processor import InputProcessor
assert not getattr(InputProcessor, "_safeinfer_hooked", False), "no hooks on unknown internals"
model = sys.argv[1]
EngineArgs(model=model).create_engine_config()
try:
    EngineArgs(model=model, additional_config={"safeinfer": {"mode": "off"}}).create_engine_config()
except RuntimeError as err:
    print(json.dumps(str(err)))
"""


def test_unknown_internals_leave_vllm_working_without_safeinfer(tiny_assets):
    """In a fresh process: a vLLM whose internals the plugin does not know still builds
    engine configs without `safeinfer` (a warning, no hooks), and one that configures it
    fails with the missing internal named."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", GUARD_SCRIPT, tiny_assets("tiny-llama").model],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "vLLM runs without SafeInfer" in done.stderr
    message = json.loads(done.stdout.strip().splitlines()[-1])
    assert "kv_cache_utils.renamed_in_a_future_vllm is missing" in message


WORKER_SCRIPT = """
import sys
import vllm.v1.worker.gpu_worker  # what a worker process has loaded when plugins load
before = {m for m in sys.modules if m.startswith("vllm.entrypoints")}
from vllm_safeinfer.plugin import register
register()
added = {m for m in sys.modules if m.startswith("vllm.entrypoints")} - before
assert not added, f"the plugin imported entrypoints: {sorted(added)}"
from vllm.entrypoints.generate.beam_search import offline, online
assert offline.BeamSearchOfflineMixin.beam_search._safeinfer
assert online.BeamSearchOnlineMixin.beam_search._safeinfer
print("ok")
"""


def test_workers_do_not_import_the_beam_search_entrypoints():
    """register() runs in every vLLM process; the beam-search refusal is installed when
    the frontend imports those modules, not by importing them everywhere."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", WORKER_SCRIPT], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr
