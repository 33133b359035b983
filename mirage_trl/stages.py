"""The training stages a Mirage model goes through, as its settings record them (`stage`, `stages`)."""

from __future__ import annotations

STAGE1, STAGE2, GRPO_STAGE = 1, 2, 3  # the SFT trainer runs 1 and 2
SFT_STAGES = (STAGE1, STAGE2)
STAGES = (STAGE1, STAGE2, GRPO_STAGE)
STAGE_NAMES = {STAGE1: "stage 1", STAGE2: "stage 2", GRPO_STAGE: "GRPO"}
