"""What an expert folder holds besides its checkpoint: written by the offline builders
(`safeinfer expert build`), read by the engine and the reports."""
from __future__ import annotations

# How the expert was made: its recipe (`method`), base model and provenance.
EXPERT_METADATA = "safeinfer_expert.json"
# An `ablate` expert's refusal direction. In a subfolder: vLLM loads every top-level
# *.safetensors file of a checkpoint as weights.
DIRECTION_FILE = "safeinfer/refusal_direction.safetensors"
DIRECTION_KEY = "refusal_direction"
