"""SafeInfer's offline tools, one wing per product: `vector` (the safety vector:
`demonstrations`, `heads`, `refusal` and its `builder`), `probe` (the harm probe:
`prompts`, `states`, `fit`, `monitor`, `report` and its `builder`), `expert` (the unsafe
expert: `finetune`, `distill`, `recipes`, and `project_models`, SmolLM2's expert trained
on first use) and `workflows` (SafeInfer measured end to end: `calibrate` and
`calibration_choice`, `demo`, `evidence` and `evidence_cache`). Shared by the wings and the
tests: `hf` (the one HF model loader and left-padding helper) and `reference` (the HF
reference implementation)."""
