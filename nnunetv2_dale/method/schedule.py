"""The alternating schedule (DESIGN.md 1.3): a pure function of the epoch, so ``--c`` resumes in
the right phase.

warm-up (the first ``warmup_fraction`` of the epochs, at least one, or fewer where the trainer's
curve horizon froze the memory earlier): nnU-Net's stock loss while the memory fills; then blocks
of ``period`` epochs alternate, stable phase first. Without alternation every post-warm-up epoch
is "joint" (both objectives summed).
"""
from __future__ import annotations

WARMUP, STABLE, FUZZY, JOINT = "warmup", "stable", "fuzzy", "joint"
PHASE_CODES = {WARMUP: 0, STABLE: 1, FUZZY: 2, JOINT: 3}


def warmup_epochs(num_epochs: int, warmup_fraction: float) -> int:
    return max(1, round(num_epochs * warmup_fraction))


def phase_of_epoch(epoch: int, warmup: int, period: int = 1, alternate: bool = True) -> str:
    """The phase of ``epoch`` when the first ``warmup`` epochs are the warm-up."""
    if epoch < warmup:
        return WARMUP
    if not alternate:
        return JOINT
    return STABLE if ((epoch - warmup) // max(period, 1)) % 2 == 0 else FUZZY


def alignment_weight(epoch: int, num_epochs: int, warmup: int, max_weight: float,
                     rampup_fraction: float = 0.2, cooldown_fraction: float = 0.0) -> float:
    """lambda: 0 during the ``warmup`` epochs, then a linear ramp to ``max_weight`` over
    ``rampup_fraction`` of the remaining epochs; over the last ``cooldown_fraction`` of all epochs
    it falls linearly back towards 0 (the last epoch keeps 1 / (cooldown epochs) of it)."""
    if epoch < warmup:
        return 0.0
    ramp = max(1.0, rampup_fraction * (num_epochs - warmup))
    weight = max_weight * min(1.0, (epoch - warmup + 1) / ramp)
    if cooldown_fraction > 0:
        weight *= min(1.0, (num_epochs - epoch) / max(1.0, cooldown_fraction * num_epochs))
    return weight
