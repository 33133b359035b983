"""Latent visual tokens: the special tokens, the one slot-filling mechanism, and model plumbing.

`slots.latent_inputs` is the single place where latent slots get their input vectors; stage 1
(pooled helper features), stage 2 (self-generated hidden states), latent decoding and GRPO all
go through it.
"""
