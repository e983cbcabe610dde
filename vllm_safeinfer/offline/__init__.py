"""SafeInfer's offline tools, one concept per module: `hf` (the one HF model loader and
left-padding helper), `demonstrations` (safe demonstrations and in-context prompts),
`heads` (head activations, residual norms, head ranking), `vector_builder` (the safety
vector), `expert` (the unsafe expert) and `calibrate` (strengths chosen by measurement)."""
