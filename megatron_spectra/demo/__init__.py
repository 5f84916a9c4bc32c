"""`spectra demo`, the main job: spectra-adamw against AdamW on a small LLaMA-style
megatron-core GPT, at the recipe's learning rate and at a large one (see `cli`)."""
