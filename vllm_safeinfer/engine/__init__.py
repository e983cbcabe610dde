"""What runs inside vLLM's engine: the engine core (`prefix_cache`: each request's cache
identity) and the workers (`worker` installs the rest after `load_model`: the batch
state, steering, the harm probe, the unsafe expert and the logits processor)."""
