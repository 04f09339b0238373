"""``optim.training_stages``: the default trains every epoch as before; ``base_fast_slow`` trains task 0
whole, then a later task's expert alone (fast stage) and then the shared parts it still trains
(slow stage, lower learning rate), checked on a real two-task fit of the tiny model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from anomalib.engine import Engine
from helpers import quiet_engine, tiny_config
from lightning.pytorch import Callback

from anomalib_moleflow import MoLEFlow, MoLEFlowConfig
from anomalib_moleflow.data import MVTecADLocal
from anomalib_moleflow.models.moleflow.training_stages import (
    fast_epochs,
    stage_of_epoch,
)

#: Baseline 2.0's shared parts that keep training after task 0: the spatial mixer and the subnets' context branch.
STAGED = {
    "optim.training_stages": "base_fast_slow",
    "flow.use_context_gate": True,
    "flow.freeze_mixer_after_task0": False,
    "flow.freeze_context_after_task0": False,
}


def test_epoch_split_and_stage_names() -> None:
    assert [fast_epochs(n, 0.5) for n in (1, 2, 3, 4, 10)] == [1, 1, 2, 2, 5]
    assert fast_epochs(10, 0.01) == 1 and fast_epochs(10, 0.99) == 9  # each stage gets an epoch
    assert [stage_of_epoch(False, e, 4, 0.5) for e in range(4)] == ["fast", "fast", "slow", "slow"]
    assert {stage_of_epoch(True, e, 4, 0.5) for e in range(4)} == {"base"}


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"optim.training_stages": "fast_slow"}, "optim.training_stages must be one of 'single', 'base_fast_slow'"),
        ({**STAGED, "optim.fast_epochs_ratio": 1.0}, r"optim.fast_epochs_ratio must be in \(0, 1\)"),
        ({**STAGED, "optim.slow_lr_ratio": 0.0}, "optim.slow_lr_ratio must be > 0"),
        ({"optim.training_stages": "base_fast_slow"}, "every shared part is frozen after task 0"),
    ],
)
def test_bad_stage_settings_are_named(overrides: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)


def test_default_is_one_group_at_the_full_rate(tiny_config: MoLEFlowConfig) -> None:
    assert tiny_config.optim.training_stages == "single"
    model = MoLEFlow(config=tiny_config.updated({"flow.freeze_mixer_after_task0": False}))
    model.add_task()
    model.add_task()
    optimizer = model.configure_optimizers()["optimizer"]
    assert len(optimizer.param_groups) == 1
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == {id(p) for p in model.model.trainable_parameters("1")}


class _Snapshots(Callback):
    """Copies of every parameter of the torch model at the start of the fit and after each epoch,
    and the groups' learning rates at the start of each epoch."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []
        self.lrs: list[list[float]] = []

    def _take(self, module: MoLEFlow) -> None:
        self.states.append({n: p.detach().clone() for n, p in module.model.named_parameters()})

    def on_train_start(self, trainer: object, pl_module: MoLEFlow) -> None:
        self._take(pl_module)

    def on_train_epoch_start(self, trainer: Any, pl_module: MoLEFlow) -> None:
        self.lrs.append([group["lr"] for group in trainer.optimizers[0].param_groups])

    def on_train_epoch_end(self, trainer: object, pl_module: MoLEFlow) -> None:
        self._take(pl_module)


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], names: set[str]) -> set[str]:
    return {n for n in names if not torch.equal(before[n], after[n])}


def test_fast_stage_trains_the_expert_and_slow_stage_the_shared_parts(widget_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = MoLEFlow(config=tiny_config(**STAGED), evaluator=False, visualizer=False)
    datamodule = MVTecADLocal(root=widget_root, category="widget", train_batch_size=4, eval_batch_size=4, num_workers=0)
    quiet_engine(tmp_path / "task0", max_epochs=1).fit(module, datamodule=datamodule)
    model = module.model
    model.add_task("second")
    names = {id(p): n for n, p in model.named_parameters()}
    expert = {names[id(p)] for p in model.expert_parameters("1")}
    shared = model.shared_parameters()
    slow = {names[id(p)] for p in shared["mixer"] + shared["context"]}
    frozen = {names[id(p)] for p in shared["base"]} | {names[id(p)] for p in model.expert_parameters("0")}
    assert expert and slow and frozen and not (expert & slow)

    snapshots = _Snapshots()
    engine = Engine(  # epochs 0, 1 fast; 2, 3 slow
        max_epochs=4, accelerator="cpu", devices=1, default_root_dir=tmp_path / "task1", logger=False,
        enable_progress_bar=False, callbacks=[snapshots], limit_train_batches=2, limit_val_batches=1,
    )  # fmt: skip
    engine.fit(module, datamodule=datamodule)
    groups = engine.trainer.optimizers[0].param_groups
    lr = module.config.optim.lr
    assert [g["moleflow_stage"] for g in groups] == ["fast", "slow"]
    assert [g["initial_lr"] for g in groups] == pytest.approx([lr, lr * module.config.optim.slow_lr_ratio])

    # each stage starts its own cosine at its full rate: the fast one at epoch 0, the slow one at epoch 2
    lrs = snapshots.lrs
    assert lrs[0][0] == pytest.approx(lr) and lrs[1][0] < lr
    assert lrs[2][1] == pytest.approx(lr * module.config.optim.slow_lr_ratio) and lrs[3][1] < lrs[2][1]

    states = snapshots.states
    assert len(states) == 5
    for epoch in range(4):
        before, after = states[epoch], states[epoch + 1]
        trained = slow if epoch >= 2 else expert
        kept = expert if epoch >= 2 else slow
        assert _changed(before, after, trained), epoch  # the stage's parameters move
        assert _changed(before, after, kept | frozen) == set(), epoch  # nothing else does


def test_base_stage_trains_everything_task0_trains(widget_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = MoLEFlow(config=tiny_config(**STAGED), evaluator=False, visualizer=False)
    module.add_task()
    model = module.model
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = {names[id(p)] for p in model.trainable_parameters("0")}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    datamodule = MVTecADLocal(root=widget_root, category="widget", train_batch_size=4, eval_batch_size=4, num_workers=0)
    quiet_engine(tmp_path, max_epochs=2).fit(module, datamodule=datamodule)
    after = dict(model.named_parameters())
    moved = _changed(before, {n: p.detach() for n, p in after.items()}, trainable)
    # every group of task 0 trains (a zero-initialised LoRA B moves A only after its first step, so
    # compare per group rather than per tensor)
    shared = model.shared_parameters()
    for group in ("base", "mixer", "context"):
        assert {names[id(p)] for p in shared[group]} & moved, group
    assert {names[id(p)] for p in model.expert_parameters("0")} & moved
