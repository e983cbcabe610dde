"""Plugin wiring that needs no engine: processor activation, start-up refusals."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from vllm_safeinfer.compat import check_supported, check_vllm_internals, supported_vllm_range
from vllm_safeinfer.logits_processor import FQCN, SafeInferLogitsProcessor
from vllm_safeinfer.plugin import register, with_processor
from vllm_safeinfer.worker import find_logits_processor


def test_processor_is_added_once():
    assert with_processor(None) == [FQCN]
    assert with_processor(["other.module:Proc"]) == ["other.module:Proc", FQCN]
    for named in (FQCN, "vllm_safeinfer.logits_processor:SafeInferLogitsProcessor",
                  SafeInferLogitsProcessor):
        assert with_processor([named]) == [named]


def test_missing_processor_stops_the_worker():
    runner = SimpleNamespace(input_batch=SimpleNamespace(logitsprocs=SimpleNamespace(all=())))
    with pytest.raises(RuntimeError, match="logits processor .* is not active"):
        find_logits_processor(runner)


def _vllm_config(**overrides):
    model = SimpleNamespace(runner_type="generate", is_multimodal_model=False)
    parallel = SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1)
    config = SimpleNamespace(model_config=model, parallel_config=parallel, speculative_config=None)
    for path, value in overrides.items():
        obj, attr = path.split(".") if "." in path else (None, path)
        setattr(getattr(config, obj) if obj else config, attr, value)
    return config


@pytest.mark.parametrize("overrides,message", [
    ({"model_config.runner_type": "pooling"}, "pooling model"),
    ({"speculative_config": object()}, "speculative decoding"),
    ({"parallel_config.tensor_parallel_size": 2}, "tensor parallelism"),
    ({"parallel_config.pipeline_parallel_size": 2}, "pipeline parallelism"),
    ({"model_config.is_multimodal_model": True}, "multimodal"),
])
def test_unsupported_features_are_refused(overrides, message):
    check_supported(_vllm_config())
    with pytest.raises(ValueError, match=message):
        check_supported(_vllm_config(**overrides))


def test_self_check_and_idempotent_register():
    check_vllm_internals()
    assert supported_vllm_range() == "vllm<0.33,>=0.32.0"  # setup.py's one pin
    from vllm.engine.arg_utils import EngineArgs

    register()
    hooked = EngineArgs.create_engine_config
    register()
    assert EngineArgs.create_engine_config is hooked
