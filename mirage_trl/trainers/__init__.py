"""Thin TRL trainer subclasses: only what latents change is overridden."""
