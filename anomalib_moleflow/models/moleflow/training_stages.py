"""Which parameters train in which epoch of a task: one stage, or the notes' base / fast / slow stages.

``optim.training_stages="single"`` (default): every epoch trains all of the task's trainable
parameters (:meth:`MoLEFlowModel.trainable_parameters`) at ``optim.lr``.

``"base_fast_slow"`` follows the Baseline 2.0 trainer's ``_train_base_task``, ``_train_fast_stage``
and ``_train_slow_stage``. The notes name these stages and the model's ``get_fast_params`` /
``freeze_fast_params`` / ``unfreeze_fast_params`` (the fast parameters: each task's LoRA, adapter
and DIA), but give neither the split of the epochs nor the learning rates nor what the slow stage
trains; this package chooses:

* task 0, **base** stage: every epoch trains everything task 0 trains (as ``"single"``);
* a later task, **fast** stage: the first ``optim.fast_epochs_ratio`` of its epochs (rounded, at
  least one, and at least one epoch left for the slow stage when the task has two or more) train
  only its own expert (LoRA pairs and biases, input adapter, DIA) at ``optim.lr``;
* then the **slow** stage: the expert's parameters are frozen and the shared parameters the task
  may still train (those the ``flow.freeze_*_after_task0`` switches leave trainable: in Baseline
  2.0 the spatial mixer and the subnets' context convs and gates) train at
  ``optim.lr * optim.slow_lr_ratio``.

Each stage runs its own cosine schedule (the fast stage after the configured warm-up, the slow
stage from its full rate, as two training loops would). Both parameter groups stay in the
optimiser and keep ``requires_grad`` (so DDP sees the same parameters every step); each step drops
the gradients of the group whose stage is not running, so the optimiser neither moves nor decays
those parameters and gradient clipping measures only the stage's own.
"""

from __future__ import annotations

from typing import Any, Literal

TrainingStages = Literal["single", "base_fast_slow"]
Stage = Literal["base", "fast", "slow"]
TRAINING_STAGES: tuple[str, ...] = ("single", "base_fast_slow")
STAGE_KEY = "moleflow_stage"
"""Param-group key naming the stage a group trains in (absent: every stage)."""


def fast_epochs(max_epochs: int, fast_epochs_ratio: float) -> int:
    """Epochs of a later task's fast stage out of its ``max_epochs`` (the rest are the slow stage)."""
    if max_epochs < 2:
        return max(1, max_epochs)
    return min(max_epochs - 1, max(1, round(fast_epochs_ratio * max_epochs)))


def stage_of_epoch(first_task: bool, epoch: int, max_epochs: int, fast_epochs_ratio: float) -> Stage:
    """The stage epoch ``epoch`` (from 0) of a task with ``max_epochs`` epochs runs in."""
    if first_task:
        return "base"
    return "fast" if epoch < fast_epochs(max_epochs, fast_epochs_ratio) else "slow"


def parameter_groups(model: Any, key: str, lr: float, slow_lr_ratio: float) -> list[dict[str, Any]]:
    """The optimiser's parameter groups for task ``key`` in the ``base_fast_slow`` mode: one group
    on task 0; on a later task its expert (fast, ``lr``) and the shared parameters it trains (slow,
    ``lr * slow_lr_ratio``). Call after :meth:`MoLEFlowModel.prepare_task_training`."""
    trainable = model.trainable_parameters(key)
    if model.task_keys.index(key) == 0:
        return [{"params": trainable, "lr": lr, STAGE_KEY: "base"}]
    fast_ids = {id(p) for p in model.expert_parameters(key)}
    fast = [p for p in trainable if id(p) in fast_ids]
    slow = [p for p in trainable if id(p) not in fast_ids]
    return [
        {"params": fast, "lr": lr, STAGE_KEY: "fast"},
        {"params": slow, "lr": lr * slow_lr_ratio, STAGE_KEY: "slow"},
    ]


def drop_other_stages(param_groups: list[dict[str, Any]], stage: Stage) -> None:
    """Set the gradients of every group that does not train in ``stage`` to ``None`` (the optimiser
    then skips those parameters)."""
    for group in param_groups:
        if group.get(STAGE_KEY, stage) != stage:
            for param in group["params"]:
                param.grad = None

