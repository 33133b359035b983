"""Thin TRL trainer subclasses (only what latents change is overridden): Mirage SFT (stages 1-2), Mirage
GRPO, the text-only baseline, the mixin they share (`common`) and callbacks."""
