"""Latent visual tokens, one module per concept: the tokens (`tokens`), where the slots are (`layout`),
how they are filled (`slots.latent_inputs`, the single place every stage and decoding goes through),
what they receive after stage 1 (`feedback`), the Mirage settings (`settings`), stage-1 targets
(`targets`), stage-2 rounds (`rounds`) and forward (`stage2`), latent health (`health`) and model
plumbing (`model_utils`).
"""
