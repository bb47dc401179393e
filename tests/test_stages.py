"""The stage timeline and unfreeze level are pure functions of the config and the epoch."""

import pytest

from core.errors import UserError
from training.config import Config
from training.stages import (batches_per_epoch, plan_stages, stage_of_epoch, steps_per_epoch,
                             unfreeze_level)


def test_two_stages_with_their_own_lr_and_batch_size():
    cfg = Config(epochs=10, stage1_epochs=4, lr=1e-3, stage2_lr=5e-4, batch_size=4, stage2_batch_size=2,
                 warmup_epochs=2)
    s1, s2 = plan_stages(cfg)
    assert (s1.start_epoch, s1.end_epoch, s1.base_lr, s1.batch_size, s1.warmup_epochs) == (0, 4, 1e-3, 4, 0)
    assert (s2.start_epoch, s2.end_epoch, s2.base_lr, s2.batch_size, s2.warmup_epochs) == (4, 10, 5e-4, 2, 2)
    assert stage_of_epoch([s1, s2], 3) is s1 and stage_of_epoch([s1, s2], 4) is s2


def test_stage2_defaults_to_stage1_values_and_empty_stages_are_dropped():
    cfg = Config(epochs=5, stage1_epochs=0, lr=2e-4, batch_size=3)
    (only,) = plan_stages(cfg)
    assert only.name == "stage2" and only.base_lr == 2e-4 and only.batch_size == 3
    assert [s.name for s in plan_stages(Config(epochs=5, stage1_epochs=5))] == ["stage1"]


def test_restart_moves_only_the_schedule_start_of_the_containing_stage():
    cfg = Config(epochs=20, stage1_epochs=5)
    s1, s2 = plan_stages(cfg, restart_at=12)
    assert s1.schedule_start == 0 and s2.schedule_start == 12 and s2.start_epoch == 5
    assert s2.schedule_epochs == 8


def test_unfreeze_level_progressive_from_the_deepest_stage():
    cfg = Config(epochs=30, stage1_epochs=10, progressive_unfreeze=True, unfreeze_interval=3)
    levels = [unfreeze_level(cfg, e, 4) for e in range(30)]
    assert levels[:10] == [0] * 10
    assert levels[10:13] == [1, 1, 1] and levels[13] == 2 and levels[22] == 5 and max(levels) == 5
    assert levels == sorted(levels)
    # default interval: whole backbone trainable by the middle of stage 2
    auto = Config(epochs=30, stage1_epochs=10, progressive_unfreeze=True)
    assert unfreeze_level(auto, 10 + 10, 4) == 5
    assert unfreeze_level(Config(epochs=30, stage1_epochs=10), 10, 4) == 5


def test_batches_and_steps_per_epoch():
    assert batches_per_epoch(10, 4, None) == 2          # last partial batch dropped
    assert batches_per_epoch(3, 4, None) == 1           # tiny dataset: one short batch
    assert batches_per_epoch(100, 4, 7) == 7
    assert steps_per_epoch(7, 2) == 4 and steps_per_epoch(8, 4) == 2


@pytest.mark.parametrize("kwargs, flag", [
    (dict(epochs=0), "--epochs"), (dict(accumulation_steps=0), "--accumulation-steps"),
    (dict(val_split=1.0), "--val-split"), (dict(min_lr=1.0), "--min-lr"),
    (dict(ds_weights=(1.0,)), "--ds-weights"), (dict(stage2_lr=0.0), "--stage2-lr"),
])
def test_config_rejects_bad_values_naming_the_flag(kwargs, flag):
    with pytest.raises(UserError, match=flag):
        Config(**kwargs).validate()


def test_config_round_trips_as_plain_data():
    cfg = Config(ds_weights=(0.1, 0.2, 0.3), stage2_lr=1e-4)
    d = cfg.to_dict()
    assert all(isinstance(v, (int, float, str, bool, list, type(None))) for v in d.values())
    assert Config.from_dict(d) == cfg
