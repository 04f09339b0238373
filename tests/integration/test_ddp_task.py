"""Lightning DDP within a task (``--trainer.strategy ddp --trainer.devices 2``, ``gloo`` on the
CPU) trains the same experts as one process, to float tolerance, and fits the statistics from all
training images. Full-batch training (one batch per epoch holds every training image), so that
each step's mean gradient over the two halves is the one-process gradient; the patch memory is
off because it samples patches in image order, which differs between the two. An expert trained
apart (``--run.only_task``) trains under DDP as well."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from helpers import run_python, tiny_config

from anomalib_moleflow.continual import load_run_checkpoint
from anomalib_moleflow.data.synthetic import make_stream

TASKS = ["red_stripes", "blue_checker"]


def _run(tmp_path: Path, root: Path, name: str, *extra: str) -> tuple[dict[str, torch.Tensor], str]:
    """The run's last state dict and its stderr."""
    config = {
        "model": {"config": tiny_config(**{"scoring.patch_memory_size": 0, "routing.router": "prototype"}).to_dict()},
        "data": {"root": str(root), "tasks": TASKS, "train_batch_size": 8, "eval_batch_size": 8, "num_workers": 0},
        "trainer": {"max_epochs": 3},
        "run": {"output_dir": str(tmp_path / name)},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    done = run_python(["-m", "anomalib_moleflow", "continual", "--config", str(path), *extra], cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_run_checkpoint(tmp_path / name / "checkpoints" / "task_01_blue_checker.ckpt")[0]["state_dict"], done.stderr


def test_ddp_trains_the_one_process_experts(tmp_path: Path) -> None:
    root = make_stream(tmp_path / "data", TASKS, n_train=8, n_good=2, n_defect=2)
    one, _ = _run(tmp_path, root, "one")
    ddp, log = _run(tmp_path, root, "ddp", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert "MEMBER: 2/2" in log  # two processes trained
    listing = {p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*")}
    assert {p.relative_to(tmp_path / "ddp") for p in (tmp_path / "ddp").rglob("*")} == listing  # rank 0 alone wrote
    assert set(one) == set(ddp)
    tensors = [k for k, v in one.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    assert len([k for k in tensors if ".1." in k]) > 20  # expert 1 and its statistics among them
    for key in tensors:  # statistics of half the images would be far off (router means, thresholds)
        torch.testing.assert_close(ddp[key], one[key], rtol=1e-4, atol=1e-5, msg=lambda text, key=key: f"{key}: {text}")

    # one expert trained apart (--run.only_task) with DDP, from the one-process run's task-0 checkpoint
    base = tmp_path / "one" / "checkpoints" / "task_00_red_stripes.ckpt"
    config = tmp_path / "ddp.yaml"
    args = ["--config", str(config), "--run.only_task", "1", "--run.base", str(base), "--run.output_dir", str(tmp_path / "part")]
    done = run_python(["-m", "anomalib_moleflow", "continual", *args, "--trainer.devices", "2", "--trainer.strategy", "ddp"],
                      cwd=tmp_path, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MEMBER: 2/2" in done.stderr, done.stderr[-3000:]
    # the expert and rank 0's training log (logs/task_01_blue_checker/metrics.csv), nothing else
    assert sorted(p.name for p in (tmp_path / "part").iterdir()) == ["expert_01_blue_checker.ckpt", "logs"]
    assert (tmp_path / "part" / "logs" / "task_01_blue_checker" / "metrics.csv").is_file()
    part = torch.load(tmp_path / "part" / "expert_01_blue_checker.ckpt", weights_only=True)["state_dict"]
    assert len(part) > 20
    for key, value in part.items():
        torch.testing.assert_close(value, one[key], rtol=1e-4, atol=1e-5, msg=lambda text, key=key: f"{key}: {text}")
