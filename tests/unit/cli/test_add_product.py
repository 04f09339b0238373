"""``anomalib-moleflow add-product``: its arguments, the tasks it adds and what it refuses (a run
that grows, compared with the sequential run: ``tests/integration/test_grow_and_merge.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from anomalib_moleflow.cli import build_parser, main
from anomalib_moleflow.cli.add_product import grown_runner, new_tasks
from anomalib_moleflow.continual.run_checkpoint import RunState, save_run_checkpoint
from anomalib_moleflow.models.moleflow import MoLEFlowConfig


def test_task_values_become_task_specs() -> None:
    specs = new_tasks(["cable", "[screw, pill]", "{name: part, kind: folder, normal_dir: good}"], root="/new")
    assert [s.name for s in specs] == ["cable", "screw", "pill", "part"]
    assert [s.root for s in specs] == ["/new", "/new", "/new", None]  # a folder task keeps its own paths
    assert new_tasks(["cable"], root=None)[0].root is None  # the run's data root then


def test_repeated_task_flags_are_collected() -> None:
    cfg = build_parser().parse_args(["add-product", "--model", "run", "--task", "a", "--task", "b", "--data.root", "d"])
    assert cfg["add-product"].task == ["a", "b"] and cfg["add-product"].data.root == "d"


def test_missing_task_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["add-product", "--model", "run"]) == 2
    err = capsys.readouterr().err
    assert "task" in err and len(err.strip().splitlines()) == 1


def _run(tmp_path: Path, settings: bool = True) -> Path:
    stream = {"tasks": [{"name": "a", "kind": "mvtec", "category": "a"}], "root": str(tmp_path / "data"),
              "train_batch_size": 4, "eval_batch_size": 4, "num_workers": 2, "seed": None}  # fmt: skip
    payload = {"state_dict": {}, "hyper_parameters": {"config": MoLEFlowConfig().to_dict(), "normalize_scores": True},
               "stream": stream, "ogp": None, "results": {}}  # fmt: skip
    if settings:
        payload["settings"] = {"seed": 5, "trainer": {"max_epochs": 3, "later_task_epochs": 2, "limit_train_batches": 1.0,
                                                      "deterministic": False}}  # fmt: skip
    save_run_checkpoint(tmp_path / "run" / "checkpoints" / "task_00_a.ckpt", RunState(["a"], 1, complete=True), payload)
    return tmp_path / "run"


def test_grown_runner_takes_the_run_records(tmp_path: Path) -> None:
    run = _run(tmp_path)
    runner = grown_runner(run, new_tasks(["b"], root=str(tmp_path / "new")), num_workers=0)
    assert runner.stream.names == ["a", "b"] and runner.stream.root == str(tmp_path / "data")
    assert runner.stream.task_root(1) == tmp_path / "new" and runner.stream.num_workers == 0
    assert runner.run_options.seed == 5 and runner.run_options.output_dir == str(run)
    assert (runner.trainer_options.max_epochs, runner.trainer_options.later_task_epochs) == (3, 2)
    assert runner.model_config == MoLEFlowConfig()
    with pytest.raises(ValueError, match=r"task 'a' is already task 0 of the run"):
        grown_runner(run, new_tasks(["a"], root=None))


def test_a_run_without_records_is_refused(tmp_path: Path) -> None:
    run = _run(tmp_path, settings=False)
    with pytest.raises(ValueError, match=r"task_00_a\.ckpt' records no task stream or settings"):
        grown_runner(run, new_tasks(["b"], root=None))
