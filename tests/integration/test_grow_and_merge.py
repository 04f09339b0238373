"""A finished run learns more products, and experts trained in separate processes merge into the
sequential run: compared tensor by tensor with one sequential run over the same three products.

* ``add-product`` on a one-task run: the earlier expert and its statistics are bit-identical, the
  grown run equals the sequential run after its task 1, and the new product routes.
* ``continual --run.only_task 1|2`` in two processes at once from the same one-task base, then
  ``merge``: every tensor of the merged model equals the sequential run's, and so do the results.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, differing_keys, tiny_config

from anomalib_moleflow.cli import main
from anomalib_moleflow.continual import ContinualRunner, RunOptions, TaskStream, TrainerOptions, load_run_checkpoint
from anomalib_moleflow.data.synthetic import make_stream

TASKS = ["red_stripes", "blue_checker", "green_dots"]
CONFIG = tiny_config(**{"scoring.patch_memory_size": 256, "routing.router_memory_size": 128})


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_stream(tmp_path_factory.mktemp("stream"), TASKS, n_train=8, n_good=2, n_defect=2)


def _runner(root: Path, out: Path, tasks: list[str]) -> ContinualRunner:
    stream = TaskStream(tasks, root=str(root), train_batch_size=4, eval_batch_size=4, num_workers=0)
    return ContinualRunner(CONFIG, stream, TrainerOptions(max_epochs=1), RunOptions(output_dir=str(out)))


@pytest.fixture(scope="module")
def sequential(root: Path, tmp_path_factory: pytest.TempPathFactory) -> ContinualRunner:
    runner = _runner(root, tmp_path_factory.mktemp("sequential"), TASKS)
    runner.run()
    return runner


@pytest.fixture(scope="module")
def base(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("base")
    _runner(root, out, TASKS[:1]).run()
    return out


def _config_file(folder: Path, root: Path) -> Path:
    data = {"root": str(root), "tasks": TASKS, "train_batch_size": 4, "eval_batch_size": 4, "num_workers": 0}
    config = {"model": {"config": CONFIG.to_dict()}, "data": data, "trainer": {"max_epochs": 1}}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _state(path: Path) -> dict:
    return load_run_checkpoint(path)[0]["state_dict"]


def test_add_product_keeps_earlier_experts(sequential: ContinualRunner, base: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    grown = tmp_path / "grown"
    shutil.copytree(base, grown)
    before = _state(grown / "checkpoints" / "task_00_red_stripes.ckpt")
    assert main(["add-product", "--model", str(grown), "--task", TASKS[1]]) == 0, capsys.readouterr().err
    assert "added ['blue_checker']" in capsys.readouterr().out
    # the first checkpoint is untouched; the new one holds every earlier tensor bit for bit
    assert differing_keys(_state(grown / "checkpoints" / "task_00_red_stripes.ckpt"), before) == []
    checkpoint, state = load_run_checkpoint(grown / "checkpoints" / "task_01_blue_checker.ckpt")
    assert state.task_names == TASKS[:2] and state.complete
    after = checkpoint["state_dict"]
    earlier = [k for k in before if isinstance(before[k], torch.Tensor)]
    assert len(earlier) > 50
    assert [k for k in earlier if not torch.equal(before[k], after[k])] == []
    # ... and equals the sequential run after its task 1, every tensor
    want = _state(sequential.checkpoint_path(1))
    assert differing_keys({k: v for k, v in after.items() if k != "model._extra_state"},
                          {k: v for k, v in want.items() if k != "model._extra_state"}) == []  # fmt: skip
    metrics = json.loads((grown / "continual_metrics.json").read_text())
    assert metrics["tasks"] == TASKS[:2]
    assert metrics["final"]["blue_checker"]["routing_accuracy"] == 1.0  # the new product routes to its expert
    assert metrics["matrix"]["image_AUROC"][0][0] is not None and metrics["matrix"]["image_AUROC"][1][1] is not None

    # a product the run already has is refused, naming it
    assert main(["add-product", "--model", str(grown), "--task", TASKS[0]]) == 1
    assert "'red_stripes' is already task 0" in capsys.readouterr().err


def test_resume_over_a_stream_that_does_not_extend_the_run_is_refused(base: Path, root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(base, run)
    with pytest.raises(ValueError, match=r"task 0 is 'red_stripes' in the run but 'blue_checker' in the stream"):
        _runner(root, run, TASKS[1:]).run(resume=True)


def test_parts_in_two_processes_merge_into_the_sequential_run(
    sequential: ContinualRunner, base: Path, root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config_file(tmp_path, root)
    cli_args = [sys.executable, "-m", "anomalib_moleflow", "continual", "--config", str(config), "--run.base", str(base)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(  # noqa: S603 - our interpreter and arguments
            [*cli_args, "--run.only_task", str(t), "--run.output_dir", str(tmp_path / f"part_{t}")],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for t in (1, 2)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        assert "written to" in out
    parts = [str(tmp_path / f"part_{t}") for t in (1, 2)]
    # a part that is there is kept with --resume true (nothing trains), and refused without it
    again = ["continual", "--config", str(config), "--run.base", str(base), "--run.only_task", "1", "--run.output_dir", parts[0]]
    written = (tmp_path / "part_1" / "expert_01_blue_checker.ckpt").stat().st_mtime_ns
    assert main([*again, "--resume", "true"]) == 0
    assert main(again) == 1 and "already holds expert 1" in capsys.readouterr().err
    assert (tmp_path / "part_1" / "expert_01_blue_checker.ckpt").stat().st_mtime_ns == written
    merged = tmp_path / "merged"
    assert main(["merge", "--base", str(base), "--parts", *parts[::-1], "--output", str(merged)]) == 0, capsys.readouterr().err
    for task in range(len(TASKS)):
        name = f"task_{task:02d}_{TASKS[task]}.ckpt"
        got, want = _state(merged / "checkpoints" / name), _state(sequential.output_dir / "checkpoints" / name)
        assert differing_keys(got, want) == [], name
    got_metrics = json.loads((merged / "continual_metrics.json").read_text())
    want_metrics = json.loads((sequential.output_dir / "continual_metrics.json").read_text())
    for key in ("tasks", "matrix", "matrix_oracle", "final", "forgetting"):
        assert got_metrics[key] == want_metrics[key], key
    _, state = load_run_checkpoint(merged / "checkpoints" / "task_02_green_dots.ckpt")
    assert state.complete and state.task_names == TASKS

    # a part of another task set, or a missing part, is one clear line
    assert main(["merge", "--base", str(base), "--parts", parts[0], "--output", str(tmp_path / "m2")]) == 1
    assert "no part holds task(s) 2 'green_dots'" in capsys.readouterr().err
