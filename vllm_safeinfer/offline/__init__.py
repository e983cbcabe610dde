"""SafeInfer's offline tools, one concept per module: `hf` (the one HF model loader and
left-padding helper), `demonstrations` (safe demonstrations and in-context prompts),
`heads` (head activations, residual norms, head ranking), `vector_builder` (the safety
vector), `refusal` (the refusal direction and the model without it), `expert`, `distill`
and `recipes` (the unsafe expert), `project_models` (SmolLM2's expert trained on first
use), `probe_states`, `probe_fit` and `probe_builder` (the harm probe), `calibrate` and
`calibration_choice` (strengths chosen by measurement), `demo` and `evidence` (SafeInfer
measured end to end) and `reference` (the HF reference implementation)."""
