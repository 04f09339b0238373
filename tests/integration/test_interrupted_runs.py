"""SIGTERM at four points of a continual run: it stops at the next safe point, keeps every task it
finished (bit-identical to an uninterrupted run's), drops the one in progress, says how to resume,
and the resumed run equals the uninterrupted one."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import differing_keys, tiny_config

from anomalib_moleflow.continual import ContinualRunner, RunOptions, TaskStream, TrainerOptions, load_run_checkpoint
from anomalib_moleflow.continual import runner as runner_module
from anomalib_moleflow.continual.interruption import RunInterrupted
from anomalib_moleflow.data.synthetic import make_stream
from anomalib_moleflow.models.moleflow import MoLEFlowModel

TASKS = ["red_stripes", "blue_checker", "green_dots"]


def _term() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_stream(tmp_path_factory.mktemp("stream"), TASKS, n_train=8, n_good=2, n_defect=2)


def _runner(root: Path, out: Path, callbacks: list | None = None) -> ContinualRunner:
    config = tiny_config(**{"scoring.patch_memory_size": 256, "routing.router_memory_size": 128})
    stream = TaskStream(TASKS, root=str(root), train_batch_size=4, eval_batch_size=4, num_workers=0)
    return ContinualRunner(config, stream, TrainerOptions(max_epochs=1), RunOptions(output_dir=str(out), extra_callbacks=callbacks or []))


@pytest.fixture(scope="module")
def uninterrupted(root: Path, tmp_path_factory: pytest.TempPathFactory) -> ContinualRunner:
    runner = _runner(root, tmp_path_factory.mktemp("full"))
    runner.run()
    return runner


class _TermAtFirstBatch:
    """A callback that sends SIGTERM at the first training batch of task 1."""

    def __init__(self) -> None:
        from lightning.pytorch import Callback

        class Cb(Callback):
            def on_train_batch_end(self, trainer, pl_module, *args) -> None:  # noqa: ANN001, ANN002
                if pl_module.model.active_task == "1" and trainer.global_step == 1:
                    _term()

        self.callback = Cb()


def _patch_router_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    original = MoLEFlowModel.fit_task_statistics

    def fit(self: MoLEFlowModel, key: str, chunks: object) -> None:
        if key == "1":
            _term()
        original(self, key, chunks)

    monkeypatch.setattr(MoLEFlowModel, "fit_task_statistics", fit)


def _patch_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    original = runner_module.evaluate_task

    def evaluate(model, datamodule, task):  # noqa: ANN001, ANN202
        if model.model.num_tasks == 2 and task == 0:
            _term()
        return original(model, datamodule, task)

    monkeypatch.setattr(runner_module, "evaluate_task", evaluate)


def _patch_checkpoint_write(monkeypatch: pytest.MonkeyPatch) -> None:
    original = runner_module.save_run_checkpoint

    def save(path, state, payload):  # noqa: ANN001, ANN202
        if "task_01" in Path(path).name:
            _term()
        return original(path, state, payload)

    monkeypatch.setattr(runner_module, "save_run_checkpoint", save)


POINTS: dict[str, tuple[Callable | None, list[str], str]] = {
    # point: (patch, checkpoints kept, phase named in the message)
    "training": (None, ["task_00_red_stripes.ckpt"], "training of task 1 'blue_checker'"),
    "router fit": (_patch_router_fit, ["task_00_red_stripes.ckpt"], "training of task 1 'blue_checker'"),
    "evaluation": (_patch_evaluation, ["task_00_red_stripes.ckpt", "task_01_blue_checker.ckpt"], "evaluation of task 1 'blue_checker'"),
    "checkpoint writing": (_patch_checkpoint_write, ["task_00_red_stripes.ckpt", "task_01_blue_checker.ckpt"], "checkpoint writing of task 1"),
}


@pytest.mark.parametrize("point", list(POINTS))
def test_sigterm_stops_at_the_next_safe_point(point: str, root: Path, tmp_path: Path, uninterrupted: ContinualRunner,
                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    patch, kept, phase = POINTS[point]
    callbacks = []
    if patch is None:
        callbacks = [_TermAtFirstBatch().callback]
    else:
        patch(monkeypatch)
    runner = _runner(root, tmp_path / "run", callbacks)
    with pytest.raises(RunInterrupted) as info:
        runner.run()
    message = str(info.value)
    assert info.value.exit_code == 143 and "SIGTERM" in message and phase in message and "--resume true" in message
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    assert checkpoints == kept
    for name in kept:  # what was kept is exactly what the uninterrupted run wrote
        got, _ = load_run_checkpoint(tmp_path / "run" / "checkpoints" / name)
        want, _ = load_run_checkpoint(uninterrupted.output_dir / "checkpoints" / name)
        assert differing_keys(got["state_dict"], want["state_dict"]) == []
    monkeypatch.undo()
    resumed = _runner(root, tmp_path / "run")
    resumed.run(resume=True)
    got, state = load_run_checkpoint(resumed.checkpoint_path(2))
    want, _ = load_run_checkpoint(uninterrupted.checkpoint_path(2))
    assert state.complete and differing_keys(got["state_dict"], want["state_dict"]) == []
    assert not (tmp_path / "run" / ".moleflow_run.lock").exists()
