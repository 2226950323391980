"""Trainable heads and adapters that sit on a frozen (or LoRA-tuned) diffusion UNet. Pure torch modules: they
never load a model and never import `interp`."""
