"""What an expert folder holds besides its checkpoint: written by the offline builders
(`safeinfer expert build`), read by the engine and the reports."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm_safeinfer.common.config import SafeInferConfig

# How the expert was made: its recipe (`method`), base model and provenance.
EXPERT_METADATA = "safeinfer_expert.json"
# An `ablate` expert's refusal direction. In a subfolder: vLLM loads every top-level
# *.safetensors file of a checkpoint as weights.
DIRECTION_FILE = "safeinfer/refusal_direction.safetensors"
DIRECTION_KEY = "refusal_direction"
# The one recipe whose expert is the served weights less a direction (it may share them).
ABLATE = "ablate"


def expert_model_config(config: SafeInferConfig, base_model_config):
    """vLLM ModelConfig of the expert: the served model's tokenizer and limits."""
    from vllm.config import ModelConfig

    return ModelConfig(
        model=config.expert_model,
        tokenizer=base_model_config.tokenizer,
        dtype=config.expert_dtype or base_model_config.dtype,
        seed=base_model_config.seed,
        max_model_len=base_model_config.max_model_len,
        enforce_eager=base_model_config.enforce_eager,
        trust_remote_code=base_model_config.trust_remote_code,
    )
