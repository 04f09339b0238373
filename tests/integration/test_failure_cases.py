"""Every failure the continual command knows, run for real on tiny data: exit code, one message line
naming the file or key, no traceback, nothing changed on disk. The cases also write the table in
``docs/failure_cases.md`` (``MOLEFLOW_WRITE_FAILURE_TABLE=1 pytest tests/integration/test_failure_cases.py``
rewrites it); the last test fails when that file no longer matches what the code does."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import REPO, TINY_CONFIG, run_python
from PIL import Image

from anomalib_moleflow.data.synthetic import make_task

TABLE = REPO / "docs" / "failure_cases.md"
ROWS: dict[str, tuple[str, int, str]] = {}
ERROR = re.compile(r"^anomalib-moleflow( continual)?: (error: )?")


@dataclass
class Outcome:
    code: int
    stderr: str
    seconds: float
    line: str = field(init=False)

    def __post_init__(self) -> None:
        lines = [line for line in self.stderr.splitlines() if ERROR.match(line)]
        self.line = lines[-1] if lines else ""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("failure_data")
    for name, style in (("widget", "red_stripes"), ("gadget", "blue_checker")):
        make_task(root, name, style=style, n_train=8, n_good=2, n_defect=2, defect_name="defect")
    return root


def _config(tmp: Path, data: Path, tasks: list | None = None, **data_settings: object) -> Path:
    config = {
        "model": {"config": {**TINY_CONFIG, "scoring": {"patch_memory_size": 256}, "routing": {"router_memory_size": 128}}},
        "data": {"root": str(data), "tasks": tasks or ["widget"], "train_batch_size": 4, "eval_batch_size": 4,
                 "num_workers": 0, **data_settings},
        "trainer": {"max_epochs": 1},
    }  # fmt: skip
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(config: Path, out: Path, *args: str, timeout: int = 300) -> Outcome:
    start = time.perf_counter()
    proc = run_python(["-m", "anomalib_moleflow", "continual", "--config", str(config), "--run.output_dir", str(out), *args],
                      cwd=REPO, timeout=timeout)  # fmt: skip
    return Outcome(proc.returncode, proc.stderr, time.perf_counter() - start)


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def _record(case: str, outcome: Outcome, tmp: Path, data: Path | None = None) -> None:
    message = outcome.line.replace(str(tmp), "<tmp>")
    if data is not None:
        message = message.replace(str(data), "<data>")
    message = re.sub(r"pid \d+ on host \S+ since [\d: -]+", "pid <pid> on host <host> since <time>", message)
    message = re.sub(r"\(\d+ bytes\)", "(<n> bytes)", message)  # a checkpoint's size changes with what it holds
    ROWS[case] = (case, outcome.code, message)


def _fails_cleanly(outcome: Outcome, code: int, *named: str) -> None:
    assert outcome.code == code, outcome.stderr[-3000:]
    assert "Traceback" not in outcome.stderr, outcome.stderr[-3000:]
    assert outcome.line, outcome.stderr[-3000:]
    for text in named:
        assert text in outcome.line, (text, outcome.line)


def _copy_data(data: Path, tmp: Path) -> Path:
    copy = tmp / "data"
    shutil.copytree(data, copy)
    return copy


# ----------------------------------------------------------------------------- before any training
def _png(path: Path) -> Path:
    return sorted(path.glob("*.png"))[0]


PREPARE: dict[str, Callable[[Path, Path], tuple[Path, list[str], int, list[str]]]] = {}
"""case -> prepare(tmp, data) returning (config, extra args, expected exit code, texts the message must hold)."""


def case(name: str) -> Callable:
    def register(fn: Callable) -> Callable:
        PREPARE[name] = fn
        return fn

    return register


@case("data root does not exist")
def _(tmp: Path, data: Path):
    return _config(tmp, tmp / "nowhere"), [], 1, [str(tmp / "nowhere")]


@case("category folder missing")
def _(tmp: Path, data: Path):
    return _config(tmp, data, tasks=["no_such_part"]), [], 1, ["no_such_part"]


@case("folder task with no training images")
def _(tmp: Path, data: Path):
    (tmp / "empty" / "good").mkdir(parents=True)
    task = {"name": "empty", "kind": "folder", "root": str(tmp / "empty"), "normal_dir": "good"}
    return _config(tmp, data, tasks=[task]), [], 1, ["good", "no training images"]


@case("corrupt image, two data workers")
def _(tmp: Path, data: Path):
    copy = _copy_data(data, tmp)
    bad = _png(copy / "widget" / "train" / "good")
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return _config(tmp, copy, num_workers=2), [], 1, [str(bad), "cannot be decoded"]


@case("mask of another size than its image")
def _(tmp: Path, data: Path):
    copy = _copy_data(data, tmp)
    mask = _png(copy / "widget" / "ground_truth" / "defect")
    Image.open(mask).resize((32, 32)).save(mask)
    return _config(tmp, copy), [], 1, [str(mask), "32x32"]


@case("misnamed mask (same count)")
def _(tmp: Path, data: Path):
    copy = _copy_data(data, tmp)
    mask = _png(copy / "widget" / "ground_truth" / "defect")
    mask.rename(mask.with_name("zzz_mask.png"))
    return _config(tmp, copy), [], 1, ["widget"]


@case("16-bit PNG training image")
def _(tmp: Path, data: Path):
    copy = _copy_data(data, tmp)
    image = _png(copy / "widget" / "train" / "good")
    Image.fromarray((np.asarray(Image.open(image).convert("L"), dtype=np.uint16) * 257)).save(image)
    return _config(tmp, copy), [], 1, [str(image), "16-bit"]


@case("JPEG images in an MVTec folder")
def _(tmp: Path, data: Path):
    copy = _copy_data(data, tmp)
    for path in (copy / "widget" / "train" / "good").glob("*.png"):
        Image.open(path).save(path.with_suffix(".jpg"))
        path.unlink()
    return _config(tmp, copy), [], 1, ["no .png files"]


@case("unknown config key")
def _(tmp: Path, data: Path):
    return _config(tmp, data), ["--model.config.flow.no_such_field", "3"], 2, ["no_such_field"]


@case("value of the wrong type")
def _(tmp: Path, data: Path):
    return _config(tmp, data), ["--trainer.max_epochs", "many"], 2, ["trainer.max_epochs"]


@case("trainer.max_epochs 0")
def _(tmp: Path, data: Path):
    return _config(tmp, data), ["--trainer.max_epochs", "0"], 1, ["trainer.max_epochs"]


@case("trainer.max_epochs -1")
def _(tmp: Path, data: Path):
    return _config(tmp, data), ["--trainer.max_epochs", "-1"], 1, ["trainer.max_epochs"]


@case("trainer.later_task_epochs -2")
def _(tmp: Path, data: Path):
    return _config(tmp, data), ["--trainer.later_task_epochs", "-2"], 1, ["trainer.later_task_epochs"]


@case("unknown backbone")
def _(tmp: Path, data: Path):
    return _config(tmp, data), ["--model.config.features.backbone", "no_such_net"], 1, ["no_such_net"]


@case("hub backbone while offline")
def _(tmp: Path, data: Path):
    return _config(tmp, data), ["--model.config.features.backbone", "wide_resnet50_2"], 1, ["wide_resnet50_2", "tf_efficientnet_lite0"]


@case("backbone stage that does not exist")
def _(tmp: Path, data: Path):
    return _config(tmp, data), ["--model.config.features.layers", "[9]"], 1, ["stages 0..4"]


@case("duplicate task names")
def _(tmp: Path, data: Path):
    return _config(tmp, data, tasks=["widget", "widget"]), [], 1, ["duplicate task name"]


@case("an output folder that cannot be written")
def _(tmp: Path, data: Path):
    # a read-only folder (chmod 555) stops a normal user but not root, who runs CI: a path through a
    # regular file cannot be written by anyone, and takes the same check
    (tmp / "taken").write_text("a file, not a folder")
    return _config(tmp, data), ["--run.output_dir", str(tmp / "taken" / "run")], 1, [str(tmp / "taken" / "run"), "cannot write"]


@pytest.mark.parametrize("name", list(PREPARE))
def test_refused_before_training(name: str, data: Path, tmp_path: Path) -> None:
    config, args, code, named = PREPARE[name](tmp_path, data)
    out = tmp_path / "run"
    before = _listing(out) if out.exists() else {}
    outcome = _run(config, out, *args)
    _fails_cleanly(outcome, code, *named)
    assert not list(out.glob("checkpoints/*.ckpt")) and (_listing(out) if out.exists() else {}) == before
    if name == "hub backbone while offline":
        assert outcome.seconds < 60  # no hub retries
    _record(name, outcome, tmp_path, data)


# ----------------------------------------------------------------------------- during training
def test_diverging_training_stops_without_a_checkpoint(data: Path, tmp_path: Path) -> None:
    outcome = _run(_config(tmp_path, data), tmp_path / "run", "--model.config.optim.lr", "1e6")
    _fails_cleanly(outcome, 1, "non-finite", "optim.lr=1e+06")
    assert not list((tmp_path / "run").glob("checkpoints/*.ckpt"))
    assert not (tmp_path / "run" / "continual_metrics.json").exists()
    _record("loss NaN from the first step (optim.lr 1e6)", outcome, tmp_path)


def _constant_images(tmp: Path, data: Path) -> Path:
    copy = _copy_data(data, tmp)
    for path in (copy / "widget" / "train" / "good").glob("*.png"):
        Image.new("RGB", (64, 64), (90, 90, 90)).save(path)
    return _config(tmp, copy)


def _mixed_sizes(tmp: Path, data: Path) -> Path:
    copy = _copy_data(data, tmp)
    image = _png(copy / "widget" / "train" / "good")
    Image.open(image).resize((96, 64)).save(image)
    return _config(tmp, copy)


def _tiff_folder_task(tmp: Path, data: Path) -> Path:
    for split in ("good", "bad", "masks"):
        source = data / "widget" / {"good": "train/good", "bad": "test/defect", "masks": "ground_truth/defect"}[split]
        (tmp / "tiff" / split).mkdir(parents=True)
        for path in sorted(source.glob("*.png")):
            Image.open(path).save(tmp / "tiff" / split / (path.name.replace("_mask", "")[:-4] + ".tif"))
    task = {"name": "tiff_part", "kind": "folder", "root": str(tmp / "tiff"), "normal_dir": "good", "abnormal_dir": "bad",
            "mask_dir": "masks"}  # fmt: skip
    return _config(tmp, data, tasks=[task])


ACCEPTED: dict[str, tuple[Callable[[Path, Path], Path], str | None]] = {
    # case: (prepare, text of the warning it must print, or None for no warning)
    "constant-colour training images": (_constant_images, "(nearly) constant"),
    "images of different sizes in one folder": (_mixed_sizes, "come in 2 sizes"),
    "TIFF images in a folder task": (_tiff_folder_task, None),
}


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_accepted_inputs_train_and_warn(name: str, data: Path, tmp_path: Path) -> None:
    prepare, warning = ACCEPTED[name]
    outcome = _run(prepare(tmp_path, data), tmp_path / "run")
    assert outcome.code == 0, outcome.stderr[-3000:]
    assert (tmp_path / "run" / "continual_metrics.json").is_file()
    ours = [line for line in outcome.stderr.splitlines() if "UserWarning: task '" in line]
    if warning is None:
        assert not ours, ours
        ROWS[name] = (name, 0, "trains; no warning")
        return
    assert ours and warning in ours[0], outcome.stderr[-3000:]
    ROWS[name] = (name, 0, "warning: " + ours[0].split("UserWarning: ")[-1])


# ----------------------------------------------------------------------------- with a run on disk
@pytest.fixture(scope="module")
def finished(data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finished two-task run (its config and folder): read it, copy it to change it."""
    tmp = tmp_path_factory.mktemp("finished")
    config = _config(tmp, data, tasks=["widget", "gadget"])
    outcome = _run(config, tmp / "run")
    assert outcome.code == 0, outcome.stderr[-3000:]
    return config, tmp / "run"


def _copy_run(finished: tuple[Path, Path], tmp: Path, keep_task_1: bool = True) -> Path:
    run = tmp / "run"
    shutil.copytree(finished[1], run)
    if not keep_task_1:  # a run stopped after task 0 (task 1's training log went with its training)
        (run / "checkpoints" / "task_01_gadget.ckpt").unlink()
        shutil.rmtree(run / "logs" / "task_01_gadget", ignore_errors=True)
    return run


RUN_CASES: dict[str, tuple[list[str], bool, int, list[str], Callable[[Path], None] | None]] = {
    "new run in a used folder": ([], True, 1, ["already holds checkpoints", "--resume"], None),
    "resume with another task list": (["--resume", "true", "--data.tasks", "[gadget, widget]"], True, 1, ["belongs to a run"], None),
    "resume with another seed": (["--resume", "true", "--run.seed", "7"], False, 1, ["seed: 0 -> 7", "--resume-force"], None),
    "resume with other epochs": (["--resume", "true", "--trainer.max_epochs", "2"], False, 1, ["trainer.max_epochs: 1 -> 2"], None),
    "resume with another batch size": (["--resume", "true", "--data.train_batch_size", "2"], False, 1, ["data.train_batch_size: 4 -> 2"], None),
    "resume with another model config": (["--resume", "true", "--model.config.experts.lora_rank", "3"], False, 1, ["another MoLE-Flow configuration"], None),
    "bytes flipped inside a checkpoint tensor": (["--resume", "true"], True, 1, ["fails its checksum", "task_01_gadget.ckpt"], lambda run: _flip(run / "checkpoints" / "task_01_gadget.ckpt")),
    "truncated checkpoint": (["--resume", "true"], True, 1, ["Cannot load checkpoint", "task_01_gadget.ckpt"], lambda run: _truncate(run / "checkpoints" / "task_01_gadget.ckpt")),
    "checkpoint of another program": (["--resume", "true"], True, 1, ["not an anomalib_moleflow continual checkpoint"], lambda run: torch.save({"weights": torch.ones(2)}, run / "checkpoints" / "task_01_gadget.ckpt")),
    "checkpoint of a newer format": (["--resume", "true"], True, 1, ["format version 99"], lambda run: _newer(run / "checkpoints" / "task_01_gadget.ckpt")),
    "a second run on the same folder": (["--resume", "true"], True, 1, ["in use by another run"], lambda run: _lock(run, os.getpid())),
}  # fmt: skip


def _flip(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    middle = len(blob) // 2  # inside the largest tensors' bytes
    blob[middle] ^= 0xFF
    path.write_bytes(bytes(blob))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def _newer(path: Path) -> None:
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["anomalib_moleflow_continual"] = 99
    torch.save(checkpoint, path)


def _lock(run: Path, pid: int) -> None:
    import socket

    (run / ".moleflow_run.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": "2026-01-01 00:00:00"}))


@pytest.mark.parametrize("name", list(RUN_CASES))
def test_refused_with_a_run_on_disk(name: str, finished: tuple[Path, Path], tmp_path: Path) -> None:
    args, keep, code, named, change = RUN_CASES[name]
    run = _copy_run(finished, tmp_path, keep_task_1=keep)
    if change is not None:
        change(run)
    before = _listing(run)
    outcome = _run(finished[0], run, *args)
    _fails_cleanly(outcome, code, *named)
    assert _listing(run) == before  # no checkpoint or result changed
    _record(name, outcome, tmp_path)


def test_resume_force_continues_and_is_recorded(finished: tuple[Path, Path], tmp_path: Path) -> None:
    run = _copy_run(finished, tmp_path, keep_task_1=False)
    outcome = _run(finished[0], run, "--resume", "true", "--run.seed", "7", "--resume-force", "true")
    assert outcome.code == 0, outcome.stderr[-3000:]
    results = json.loads((run / "continual_metrics.json").read_text())
    assert results["resume_forced"] == ["after task 0: seed: 0 -> 7"]
    ROWS["resume with another seed and --resume-force"] = (
        "resume with another seed and --resume-force", 0, "continues; continual_metrics.json records resume_forced")


def test_stale_lock_and_temporary_files_are_cleaned(finished: tuple[Path, Path], tmp_path: Path) -> None:
    run = _copy_run(finished, tmp_path)
    _lock(run, 2**22 + 12345)  # no such process
    stale = run / "checkpoints" / ".task_01_gadget.ckpt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    outcome = _run(finished[0], run, "--resume", "true")
    assert outcome.code == 0, outcome.stderr[-3000:]
    assert "stale lock" in outcome.stderr and not stale.exists() and not (run / ".moleflow_run.lock").exists()
    ROWS["stale lock of a dead run; stale temporary files"] = (
        "stale lock of a dead run; stale temporary files", 0, "warning: taking over the stale lock ...; the .tmp files are removed")


def test_sigterm_during_training_exits_143_and_keeps_what_finished(data: Path, tmp_path: Path) -> None:
    """A real SIGTERM from outside, while task 1 trains: task 0 stays, the exit code says so."""
    import signal
    import subprocess
    import sys

    copy = _copy_data(data, tmp_path)
    config = _config(tmp_path, copy, tasks=["widget", "gadget"])
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "anomalib_moleflow", "continual", "--config", str(config), "--run.output_dir", str(out),
           "--trainer.later_task_epochs", "200"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # noqa: S603
    deadline = time.time() + 240
    while not (out / "checkpoints" / "task_00_widget.ckpt").exists() and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(3)  # task 1 is training now
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=240)
    outcome = Outcome(proc.returncode, stderr, 0.0)
    _fails_cleanly(outcome, 143, "SIGTERM", "training of task 1 'gadget'", "--resume true")
    assert sorted(p.name for p in (out / "checkpoints").glob("*.ckpt")) == ["task_00_widget.ckpt"]
    _record("SIGTERM while a task trains", outcome, tmp_path)


def test_disk_full_names_the_errno(finished: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """ENOSPC while the checkpoint is written: one line with the errno; the earlier files are intact."""
    from anomalib_moleflow import cli
    from anomalib_moleflow.continual import runner

    run = _copy_run(finished, tmp_path, keep_task_1=False)
    before = _listing(run)

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(run / "checkpoints" / "task_01_gadget.ckpt"))

    monkeypatch.setattr(runner, "save_run_checkpoint", full)
    code = cli.main(["continual", "--config", str(finished[0]), "--run.output_dir", str(run), "--resume", "true"])
    line = [line for line in capsys.readouterr().err.splitlines() if ERROR.match(line)][-1]
    assert code == 1 and "ENOSPC" in line and "task_01_gadget.ckpt" in line
    # checkpoints and results as before; the only new files are the failed training's own log
    after = _listing(run)
    assert {k: v for k, v in after.items() if not k.startswith("logs/task_01_gadget/")} == before
    assert "logs/task_01_gadget/metrics.csv" in after
    ROWS["disk full while a checkpoint is written"] = ("disk full while a checkpoint is written", 1, line.replace(str(tmp_path), "<tmp>"))


# ----------------------------------------------------------------------------- the table
def _table() -> str:
    lines = [
        "# What the continual command does when something goes wrong",
        "",
        "Generated by `tests/integration/test_failure_cases.py`, which runs every case below on tiny data and checks",
        "the exit code, that the message is one line naming the file or setting, that no traceback is printed, and",
        "that no checkpoint or result changed. Exit codes: 0 done, 1 failed, 2 bad command-line arguments,",
        "128 + signal number when a signal stopped the run (143 SIGTERM, 130 SIGINT) after saving what finished.",
        "",
        "| case | exit code | message |",
        "|---|---|---|",
    ]
    for name in sorted(ROWS):
        _, code, message = ROWS[name]
        lines.append(f"| {name} | {code} | {message.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def test_failure_table_is_up_to_date() -> None:
    expected = len(PREPARE) + len(RUN_CASES) + len(ACCEPTED) + 5
    assert len(ROWS) == expected, "run the whole module: the table needs every case"
    text = _table()
    if os.environ.get("MOLEFLOW_WRITE_FAILURE_TABLE"):
        TABLE.parent.mkdir(exist_ok=True)
        TABLE.write_text(text)
    assert TABLE.is_file() and TABLE.read_text() == text, (
        "docs/failure_cases.md is out of date: rerun with MOLEFLOW_WRITE_FAILURE_TABLE=1"
    )
