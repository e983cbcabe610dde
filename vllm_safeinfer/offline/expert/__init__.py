"""The unsafe expert's builder: fine-tuning, the distilled and ablated recipes, SmolLM2's expert."""
