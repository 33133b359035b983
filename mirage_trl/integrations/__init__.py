"""Mirage models inside other tools' harnesses (lmms-eval: `integrations.lmms_eval`)."""
