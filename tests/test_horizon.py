"""The memory horizon read from the label-confidence curve (``method/horizon.py``) and the trainer's
use of it: fired by a saturating curve, not by a still-rising one, and replayed identically by
``--c``."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from nnunetv2_dale.method.horizon import frozen_from, replay_saturation, slope_drop, update_saturation
from nnunetv2_dale.method.schedule import STABLE, WARMUP
from nnunetv2_dale.method.trainer import nnUNetTrainerDALE


def saturating(n: int, rate: float, top: float = 0.9, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    t = np.arange(1, n + 1)
    return list(top * (1 - np.exp(-rate * t)) + rng.normal(0, 0.004, n))


def test_slope_drop_of_saturating_and_linear_curves():
    fast = slope_drop(saturating(12, 0.6))
    assert fast is not None and fast > 0.95  # after 12 epochs of a curve with time constant 1.7
    assert slope_drop(saturating(3, 0.05)) < 0.5  # barely begun
    linear = slope_drop(list(0.02 * np.arange(1, 21)))  # the model's curves start at 0 before epoch 1
    assert linear is None or linear < 0.5  # still rising as fast as at the start: not saturated
    assert slope_drop([0.5, float("nan")]) is None  # too few points


def test_every_class_must_saturate_and_a_saturated_class_stays_saturated():
    slow, fast = saturating(30, 0.08, seed=1), saturating(30, 0.8, seed=2)
    curves = [[a, b] for a, b in zip(fast, slow)]
    state: list = []
    seen = []
    for t in range(1, len(curves) + 1):
        state = update_saturation(state, curves[:t])
        seen.append(list(state))
    assert seen[-1][0] is not None and seen[-1][1] is not None and seen[-1][0] < seen[-1][1]
    first_fast = seen[-1][0]
    assert all(s[0] == first_fast for s in seen[first_fast - 1:])  # never re-tested once saturated
    assert frozen_from(seen[-1]) == seen[-1][1]  # frozen when the slower class saturated
    assert frozen_from([first_fast, None]) is None
    assert replay_saturation(curves) == seen[frozen_from(seen[-1]) - 1]


@pytest.mark.parametrize("visits_per_epoch", [None, 5.0, 0.6])
def test_trainer_freezes_at_the_curve_and_resume_replays_it(tmp_path, visits_per_epoch):
    """The trainer's per-epoch update (``_update_curve_horizon``, reading nnU-Net's own logger) and
    the replay of ``load_checkpoint`` from the logger's checkpoint agree at every epoch a checkpoint
    could have been written, and the fixed share stays an upper limit. The memory waits for its
    average visit count (``dale_horizon_min_visits``): 5 visits per epoch are mature before the curve
    saturates, 0.6 only after epoch 17; a log without visits (written before they were logged)
    freezes on the curve alone. (A real training reaches saturation only after several epochs of
    real data: the benchmark runs exercise that.)"""
    from nnunetv2.training.logging.nnunet_logger import MetaLogger

    from nnunetv2_dale.method.progress import DALELocalLogger

    def trainer_state(logger):
        t = SimpleNamespace(dale_horizon_from_curve=True, dale_horizon_slope_drop=0.9, dale_memory_horizon=0.3,
                            dale_horizon_min_visits=10.0,
                            num_epochs=100, _curve_horizon=None, _curve_saturation=[], current_epoch=0,
                            dale_warmup_fraction=0.1, dale_phase_period=1, dale_use_alternation=True,
                            logger=logger, print_to_log_file=lambda *a, **k: None)
        t.memory_frozen = lambda epoch=None: nnUNetTrainerDALE.memory_frozen(t, epoch)
        t._fixed_horizon = lambda: nnUNetTrainerDALE._fixed_horizon(t)
        t._mature_from = lambda epochs: nnUNetTrainerDALE._mature_from(t, epochs)
        return t

    def new_logger():
        logger = MetaLogger(str(tmp_path), False)
        logger.local_logger = DALELocalLogger()
        return logger

    curves = [[a, b] for a, b in zip(saturating(40, 0.7, seed=3), saturating(40, 0.3, seed=4))]
    trainer = trainer_state(new_logger())
    frozen_at = None
    for epoch in range(40):
        trainer.current_epoch = epoch
        frozen = trainer.memory_frozen()
        frozen_at = epoch if frozen and frozen_at is None else frozen_at
        trainer.logger.log("dale_mean_confidence", [float("nan")] * 2 if frozen else curves[epoch], epoch)
        if visits_per_epoch is not None:  # cumulative, as on_train_epoch_end logs it
            trainer.logger.log("dale_visits_per_voxel", visits_per_epoch * (epoch + 1), epoch)
        nnUNetTrainerDALE._update_curve_horizon(trainer)
        resumed = trainer_state(new_logger())  # --c from a checkpoint written after this epoch
        resumed.logger.load_checkpoint(trainer.logger.get_checkpoint())
        resumed.current_epoch = epoch + 1
        nnUNetTrainerDALE._replay_curve_horizon(resumed)
        assert (resumed._curve_horizon, resumed._curve_saturation) == (trainer._curve_horizon, trainer._curve_saturation)
    assert frozen_at is not None and 3 <= frozen_at < 30 and frozen_at == trainer._curve_horizon
    saturated = frozen_from(trainer._curve_saturation)
    assert frozen_at == (17 if visits_per_epoch == 0.6 else saturated) and saturated < 17
    assert nnUNetTrainerDALE.memory_frozen(trainer, frozen_at) and not nnUNetTrainerDALE.memory_frozen(trainer, frozen_at - 1)
    # DALE's objective starts when the memory freezes, if that comes before the fixed warm-up (10 epochs)
    trainer.warmup_end = lambda: nnUNetTrainerDALE.warmup_end(trainer)
    start = nnUNetTrainerDALE.warmup_end(trainer)
    assert start == min(10, frozen_at)
    assert [nnUNetTrainerDALE.phase(trainer, e) for e in (start - 1, start)] == [WARMUP, STABLE]
    trainer._curve_horizon = None  # a curve that never saturates: the fixed share still freezes it
    assert nnUNetTrainerDALE.memory_frozen(trainer, 30) and not nnUNetTrainerDALE.memory_frozen(trainer, 29)
    assert nnUNetTrainerDALE.warmup_end(trainer) == 10 and nnUNetTrainerDALE.phase(trainer, 9) == WARMUP
