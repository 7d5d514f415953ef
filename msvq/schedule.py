"""Per-step learning-rate schedules."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Return the learning rate at ``step`` (0-based): linear warm-up, then cosine to 0.

    During warm-up the rate rises linearly and reaches ``base_lr`` at step
    ``warmup_steps``; afterwards it follows half a cosine down to 0 at ``total_steps``.
    """
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
