"""End-to-end tests of :class:`ContinualRunner` on a tiny synthetic two-product stream.

One full run (module fixture ``finished_run``) is shared by most tests; the resume test
trains a second, interrupted-then-resumed run and compares it with the first one. The
products (:mod:`anomalib_moleflow.data.synthetic`) differ in colour and texture, so routing them is
trivial; the model is tiny (64 px, 2 coupling blocks, rank-2 LoRA) and trains one epoch,
so anomaly metrics themselves are not checked, only their bookkeeping.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import differing_keys, read_image, task_test_images

from anomalib_moleflow.continual.run_checkpoint import (
    FORMAT_KEY,
    FORMAT_VERSION,
    load_run_checkpoint,
    save_run_checkpoint,
)
from anomalib_moleflow.continual.runner import (
    ContinualRunner,
    RunOptions,
    TrainerOptions,
    build_model,
)
from anomalib_moleflow.continual.task_stream import TaskStream
from anomalib_moleflow.data.synthetic import make_stream, make_task
from anomalib_moleflow.io import CheckpointError
from anomalib_moleflow.models.moleflow import (
    MoLEFlow,
    MoLEFlowConfig,
    RoutedInferenceBatch,
)
from anomalib_moleflow.models.moleflow.gaussian import pool_features

TASKS = ("red_stripes", "blue_checker")
UNKNOWN_PRODUCT = "green_dots"  # never trained: an "unknown product"
METRICS = ("image_AUROC", "pixel_AUROC", "pixel_AP", "image_F1")


# ----------------------------------------------------------------------------- helpers
def make_runner(
    root: Path, output_dir: Path, config: MoLEFlowConfig, tasks: tuple[str, ...] | list[str] = TASKS
) -> ContinualRunner:
    stream = TaskStream(list(tasks), root=str(root), train_batch_size=8, eval_batch_size=8, num_workers=0)
    return ContinualRunner(config, stream, TrainerOptions(max_epochs=1), RunOptions(output_dir=str(output_dir)))


@dataclass
class FinishedRun:
    runner: ContinualRunner
    root: Path
    output_dir: Path
    config: MoLEFlowConfig

    def checkpoint(self, task: int) -> Path:
        return self.runner.checkpoint_path(task)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a small, busy machine OpenMP threads that spin-wait for each
    other make every convolution tens of times slower (3.4 s instead of 0.05 s per batch)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def stream_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic_mvtec")
    # 20 training images: enough for a stable router calibration (see test_unknown_product_flagged)
    make_stream(root, TASKS, n_train=20)
    make_task(root, UNKNOWN_PRODUCT, seed=len(TASKS))
    return root


@pytest.fixture(scope="module")
def finished_run(stream_root: Path, tiny_config: MoLEFlowConfig, tmp_path_factory: pytest.TempPathFactory) -> FinishedRun:
    config = tiny_config
    output_dir = tmp_path_factory.mktemp("finished_run")
    runner = make_runner(stream_root, output_dir, config)
    runner.run()
    return FinishedRun(runner=runner, root=stream_root, output_dir=output_dir, config=config)


# ----------------------------------------------------------------------------- 0. the model
def test_build_model_normalises_scores_per_task(tiny_config: MoLEFlowConfig) -> None:
    model = build_model(tiny_config)
    assert model.config == tiny_config and model.normalize_scores and model.model.normalizes_scores
    assert model.evaluator is None and model.visualizer is None
    assert model.model.num_tasks == 0  # the runner adds the experts
    post = model.post_processor.state_dict()  # pass-through thresholding at 0.5 on [0, 1] scores
    assert float(post["_image_threshold"]) == 0.5 and float(post["_pixel_threshold"]) == 0.5
    assert float(post["image_min"]) == 0.0 and float(post["image_max"]) == 1.0


def test_options_defaults() -> None:
    assert TrainerOptions().max_epochs == 8 and TrainerOptions().later_task_epochs is None
    assert RunOptions().use_ogp is False and RunOptions().extra_callbacks == []


# ----------------------------------------------------------------------------- 1. results
def test_results_files(finished_run: FinishedRun) -> None:
    out = finished_run.output_dir
    for name in ("continual_metrics.json", "continual_matrix.csv", "continual_matrix.png"):
        assert (out / name).is_file(), name
    assert (out / "continual_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv_lines = (out / "continual_matrix.csv").read_text().splitlines()
    assert csv_lines[0] == "after_task,task,metric,mode,value"
    assert any(line.startswith("blue_checker,red_stripes,image_AUROC,routed,") for line in csv_lines)

    data = json.loads((out / "continual_metrics.json").read_text())
    n = len(TASKS)
    assert data["tasks"] == list(TASKS)
    for section, keys in (("matrix", (*METRICS, "routing_accuracy")), ("matrix_oracle", METRICS)):
        for key in keys:
            rows = data[section][key]
            assert len(rows) == n and all(len(row) == n for row in rows), (section, key)
            for t in range(n):
                for i in range(n):
                    if i > t:
                        assert rows[t][i] is None, (section, key, t, i)
                    else:
                        assert isinstance(rows[t][i], float) and 0.0 <= rows[t][i] <= 1.0, (section, key, t, i)
    assert set(data["final"]) == set(TASKS)
    for name in TASKS:
        row = data["final"][name]
        for key in METRICS:
            assert 0.0 <= row[key] <= 1.0
            assert 0.0 <= row["oracle"][key] <= 1.0
        # separable products: every test image goes to its own expert, so routed == oracle
        assert row["routing_accuracy"] == 1.0
        assert {key: row[key] for key in METRICS} == row["oracle"]
    for key in (*METRICS, "routing_accuracy"):
        assert data["mean"][key] == pytest.approx(np.mean([data["final"][t][key] for t in TASKS]))
    # old experts are bit-identical, so nothing is forgotten, exactly
    for key in METRICS:
        assert data["forgetting"][key] == 0.0
        assert data["forgetting"]["oracle"][key] == 0.0
        for section in ("matrix", "matrix_oracle"):
            assert data[section][key][1][0] == data[section][key][0][0]
    timing = data["timing"]
    assert set(timing["train_seconds"]) == set(TASKS)
    assert all(seconds > 0 for seconds in timing["train_seconds"].values())
    assert timing["inference_ms_per_image"] > 0

    # the run is complete; each checkpoint records how far it got
    for task in range(n):
        checkpoint, state = load_run_checkpoint(finished_run.checkpoint(task), expected_tasks=list(TASKS))
        assert state.completed_tasks == task + 1
        assert state.complete is (task == n - 1)
        assert checkpoint[FORMAT_KEY] == FORMAT_VERSION
        assert checkpoint["results"]["matrix"]["image_AUROC"][task][0] == data["matrix"]["image_AUROC"][task][0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted(
        f"task_{t:02d}_{name}.ckpt" for t, name in enumerate(TASKS)
    )


def test_checkpoint_is_a_lightning_checkpoint(finished_run: FinishedRun) -> None:
    """Format 2: the model part is what Lightning and anomalib load; the run's keys sit beside it."""
    checkpoint, _ = load_run_checkpoint(finished_run.checkpoint(1))
    assert "model_config" not in checkpoint and "task_keys" not in checkpoint
    assert {"pytorch-lightning_version", "state_dict", "hyper_parameters", "results", "stream", "ogp"} <= set(checkpoint)
    assert checkpoint["hyper_parameters"] == {"config": finished_run.config.to_dict(), "normalize_scores": True}
    assert MoLEFlowConfig.from_dict(checkpoint["hyper_parameters"]["config"]) == finished_run.config
    assert checkpoint["stream"] == finished_run.runner.stream.to_dict()
    assert checkpoint["ogp"] is None  # OGP is off by default
    assert checkpoint["state_dict"]["model._extra_state"] == {"task_names": list(TASKS), "active_task": "1"}
    # Lightning's own loader reads it as well as the project's one
    lightning = MoLEFlow.load_from_checkpoint(finished_run.checkpoint(1), evaluator=False, visualizer=False)
    ours = MoLEFlow.from_checkpoint(finished_run.checkpoint(1))
    assert lightning.model.task_keys == ours.model.task_keys == ["0", "1"]
    assert lightning.model.task_names == ours.model.task_names == list(TASKS)
    assert differing_keys(lightning.state_dict(), ours.state_dict()) == []


# ----------------------------------------------------------------------------- 2. old experts
def test_old_expert_and_shared_parts_unchanged(finished_run: FinishedRun) -> None:
    after_task0, _ = load_run_checkpoint(finished_run.checkpoint(0))
    after_task1, _ = load_run_checkpoint(finished_run.checkpoint(1))
    state0, state1 = after_task0["state_dict"], after_task1["state_dict"]
    # The task names and the active task (the one non-tensor entry) grow with the tasks ...
    extra = "model._extra_state"
    assert state0.pop(extra) == {"task_names": [TASKS[0]], "active_task": "0"}
    assert state1.pop(extra) == {"task_names": list(TASKS), "active_task": "1"}
    # ... and every tensor that existed after task 0 (backbone, shared flow, mixer, expert 0,
    # router prototype 0, score statistics 0) is bit-identical after task 1.
    assert all(isinstance(v, torch.Tensor) for v in (*state0.values(), *state1.values()))
    assert differing_keys(state0, {k: state1[k] for k in state0 if k in state1}) == []
    assert set(state0) < set(state1)
    assert all(".1." in k or k.endswith(".1") for k in set(state1) - set(state0))

    # The same, parameter by parameter, through the model's own grouping.
    model0 = MoLEFlow.from_checkpoint(finished_run.checkpoint(0))
    final = finished_run.runner.model
    assert isinstance(final, MoLEFlow)
    old, new = model0.model.expert_parameters("0"), final.model.expert_parameters("0")
    assert len(old) == len(new) > 0
    assert all(torch.equal(a, b) for a, b in zip(old, new, strict=True))
    shared0, shared1 = model0.model.shared_parameters(), final.model.shared_parameters()
    assert shared0.keys() == shared1.keys()
    for group in shared0:
        assert len(shared0[group]) == len(shared1[group])
        assert all(torch.equal(a, b) for a, b in zip(shared0[group], shared1[group], strict=True)), group

    # Task 0's oracle scores (raw and normalised) are bit-identical too.
    images = torch.stack([read_image(p) for p in task_test_images(finished_run.root, TASKS[0])])
    final.eval()
    outputs = []
    with torch.no_grad():
        for model in (model0, final):
            features = model.model.extract_features(model.pre_processor.transform(images))
            with model.model.oracle("0"):
                normalised = model.model.predict_features(features)
                with model.model.raw_scores():
                    raw = model.model.predict_features(features)
                assert model.model.normalizes_scores  # restored after the block
            outputs.append((normalised, raw))
    for a, b in zip(outputs[0], outputs[1], strict=True):
        assert torch.equal(a.pred_score, b.pred_score)
        assert torch.equal(a.anomaly_map, b.anomaly_map)
    normalised, raw = outputs[1]
    assert not torch.equal(normalised.pred_score, raw.pred_score)  # the two really differ
    assert normalised.pred_score.min() >= 0 and normalised.pred_score.max() <= 1


# ----------------------------------------------------------------------------- 3. resume
def test_resume_matches_uninterrupted_run(
    finished_run: FinishedRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output_dir = tmp_path / "interrupted"
    train_task = ContinualRunner.train_task

    def stop_at_task1(self: ContinualRunner, task: int) -> float:
        if task == 1:
            raise RuntimeError("simulated stop before task 1")
        return train_task(self, task)

    monkeypatch.setattr(ContinualRunner, "train_task", stop_at_task1)
    with pytest.raises(RuntimeError, match="simulated stop"):
        make_runner(finished_run.root, output_dir, finished_run.config).run()
    monkeypatch.undo()

    first = make_runner(finished_run.root, output_dir, finished_run.config)
    assert first.checkpoint_path(0).is_file()
    assert not first.checkpoint_path(1).exists()
    _, state = load_run_checkpoint(first.checkpoint_path(0), expected_tasks=list(TASKS))
    assert state.complete is False
    assert state.completed_tasks == 1
    assert state.next_task == 1

    resumed = make_runner(finished_run.root, output_dir, finished_run.config)
    resumed.run(resume=True)
    assert resumed.checkpoint_path(1).is_file()

    got, got_state = load_run_checkpoint(resumed.checkpoint_path(1), expected_tasks=list(TASKS))
    want, _ = load_run_checkpoint(finished_run.checkpoint(1), expected_tasks=list(TASKS))
    assert got_state.complete is True
    assert got["hyper_parameters"] == want["hyper_parameters"]
    assert got["state_dict"]["model._extra_state"] == want["state_dict"]["model._extra_state"]
    assert differing_keys(got["state_dict"], want["state_dict"]) == []
    got_results, want_results = got["results"], want["results"]
    for section in ("matrix", "matrix_oracle", "final", "mean", "forgetting"):
        assert got_results[section] == want_results[section], section
    # task 0's training time comes from the checkpoint: it was not trained again
    saved, _ = load_run_checkpoint(first.checkpoint_path(0))
    assert got_results["timing"]["train_seconds"][TASKS[0]] == saved["results"]["timing"]["train_seconds"][TASKS[0]]


# ----------------------------------------------------------------------------- 4. refusals
@pytest.fixture
def copied_run(finished_run: FinishedRun, tmp_path: Path) -> Path:
    """A copy of the finished run's checkpoints (so refusals cannot touch the shared run)."""
    output_dir = tmp_path / "copied"
    shutil.copytree(finished_run.output_dir / "checkpoints", output_dir / "checkpoints")
    return output_dir


def _no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(self: ContinualRunner, task: int) -> float:
        raise AssertionError(f"training of task {task} started")

    monkeypatch.setattr(ContinualRunner, "train_task", fail)


def _listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.mark.parametrize("tasks", [TASKS, TASKS[::-1], (TASKS[0], UNKNOWN_PRODUCT)], ids=["same", "reversed", "other"])
def test_new_run_in_used_folder_refused(
    finished_run: FinishedRun, copied_run: Path, monkeypatch: pytest.MonkeyPatch, tasks: tuple[str, ...]
) -> None:
    _no_training(monkeypatch)
    before = _listing(copied_run)
    runner = make_runner(finished_run.root, copied_run, finished_run.config, tasks=tasks)
    with pytest.raises(FileExistsError, match=r"already holds checkpoints.*--resume") as info:
        runner.run()
    assert str(copied_run) in str(info.value)
    assert _listing(copied_run) == before


@pytest.mark.parametrize("tasks", [TASKS[::-1], (TASKS[0], UNKNOWN_PRODUCT), TASKS[:1]])
def test_resume_with_other_tasks_refused(
    finished_run: FinishedRun, copied_run: Path, monkeypatch: pytest.MonkeyPatch, tasks: tuple[str, ...]
) -> None:
    _no_training(monkeypatch)
    before = _listing(copied_run)
    runner = make_runner(finished_run.root, copied_run, finished_run.config, tasks=tasks)
    with pytest.raises(CheckpointError, match=r"belongs to a run over the tasks") as info:
        runner.run(resume=True)
    message = str(info.value)
    assert str(copied_run / "checkpoints") in message and ".ckpt" in message
    assert str(list(TASKS)) in message and str(list(tasks)) in message
    assert _listing(copied_run) == before


def test_resume_with_other_model_config_refused(
    finished_run: FinishedRun, copied_run: Path, monkeypatch: pytest.MonkeyPatch, tiny_config: MoLEFlowConfig
) -> None:
    _no_training(monkeypatch)
    before = _listing(copied_run)
    other = tiny_config.updated({"experts.lora_rank": 4})
    runner = make_runner(finished_run.root, copied_run, other)
    with pytest.raises(CheckpointError, match="another MoLE-Flow configuration") as info:
        runner.run(resume=True)
    assert str(runner.checkpoint_path(1)) in str(info.value)
    assert _listing(copied_run) == before


def test_resume_of_complete_run_trains_nothing(
    finished_run: FinishedRun, copied_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_training(monkeypatch)
    results = make_runner(finished_run.root, copied_run, finished_run.config).run(resume=True)
    want, _ = load_run_checkpoint(finished_run.checkpoint(1))
    assert results.to_dict()["matrix"] == want["results"]["matrix"]


# ----------------------------------------------------------------------------- 5. loading
def test_loaded_model_routes_mixed_batch(finished_run: FinishedRun) -> None:
    model = MoLEFlow.from_checkpoint(finished_run.checkpoint(1))
    assert not model.training
    assert model.model.task_keys == ["0", "1"]
    assert model.model.routing_active
    paths, expected = [], []
    per_task = [task_test_images(finished_run.root, name) for name in TASKS]
    for pair in zip(per_task[1], per_task[0], strict=True):  # interleave task 1 and task 0 images
        paths += pair
        expected += [1, 0]
    images = torch.stack([read_image(p) for p in paths])
    with torch.no_grad():
        out = model(images)
    assert isinstance(out, RoutedInferenceBatch)
    assert out.pred_task.tolist() == expected
    assert out.pred_score.shape == (len(paths),)
    assert out.anomaly_map.shape == (len(paths), 1, 64, 64)
    for tensor in (out.pred_score, out.anomaly_map):
        assert torch.isfinite(tensor).all()
        assert tensor.min() >= 0.0 and tensor.max() <= 1.0
    assert out.pred_label is not None and out.pred_label.dtype == torch.bool
    assert torch.equal(out.pred_label, out.pred_score > 0.5)  # anomalib thresholds with '>'


# ----------------------------------------------------------------------------- 6. unknown product
def test_unknown_product_flagged(finished_run: FinishedRun, tmp_path: Path) -> None:
    """``unknown_threshold`` only acts at routing time (training, prototypes and their
    calibration distances do not depend on it), so the finished run's checkpoint with
    ``unknown_threshold=1.5`` in its config is the checkpoint such a run would write."""
    checkpoint, state = load_run_checkpoint(finished_run.checkpoint(1))
    routing = checkpoint["hyper_parameters"]["config"]["routing"]
    assert routing["unknown_threshold"] is None
    routing["unknown_threshold"] = 1.5
    del checkpoint["anomalib_moleflow_continual"], checkpoint["run_state"], checkpoint["checksum"]
    path = save_run_checkpoint(tmp_path / "with_threshold.ckpt", state, checkpoint)

    known = [p for name in TASKS for p in sorted((finished_run.root / name / "test" / "good").glob("*.png"))]
    unknown = sorted((finished_run.root / UNKNOWN_PRODUCT / "test").glob("*/*.png"))
    images = torch.stack([read_image(p) for p in [*known, *unknown]])
    n_known = len(known)
    expected_known = [TASKS.index(p.parent.parent.parent.name) for p in known]

    plain = MoLEFlow.from_checkpoint(finished_run.checkpoint(1))
    with torch.no_grad():
        plain_route = plain(images).pred_task
    assert (plain_route >= 0).all()  # without the threshold, every image gets an expert

    model = MoLEFlow.from_checkpoint(path)
    assert model.model.router.unknown_threshold == 1.5
    # The margins on this data: (Euclidean) distance to the nearest prototype over that task's
    # calibration distance is <= 0.8 for known products' good images and >= 2.09 for the unknown product.
    # (Known *defective* images reach 1.5-2.0: their big grainy blobs move the pooled
    # features, so they would be flagged too, which still marks them anomalous.)
    with torch.no_grad():
        features = model.model.extract_features(model.pre_processor.transform(images))
    distances = model.model.router.distances(pool_features(features))
    ratio = (distances / model.model.router.calibrations()).min(dim=1).values
    assert ratio[:n_known].max() < 1.5 and ratio[n_known:].min() > 2.0, ratio  # 1.5: the threshold
    with torch.no_grad():
        out = model(images)
    route = out.pred_task
    assert route[:n_known].tolist() == expected_known
    assert (route[n_known:] == -1).all()
    assert (out.pred_score[n_known:] == 1.0).all()
    assert (out.anomaly_map[n_known:] == 1.0).all()
    assert out.pred_label[n_known:].all()
    # known products are scored as without the threshold (same expert, same statistics)
    with torch.no_grad():
        reference = plain(images[:n_known]).pred_score
    torch.testing.assert_close(out.pred_score[:n_known], reference, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- 7. bad input
def test_missing_category_fails_before_training(
    stream_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_config: MoLEFlowConfig
) -> None:
    _no_training(monkeypatch)
    built: list[object] = []
    monkeypatch.setattr("anomalib_moleflow.continual.runner.build_model", lambda config: built.append(config))
    output_dir = tmp_path / "never_written"
    runner = make_runner(stream_root, output_dir, tiny_config, tasks=(TASKS[0], "no_such_part"))
    with pytest.raises(FileNotFoundError) as info:
        runner.run()
    message = str(info.value)
    assert "task 1 'no_such_part'" in message
    assert str(stream_root) in message
    assert not output_dir.exists()
    assert built == []


# ----------------------------------------------------------------------------- 7. older checkpoints
def test_checkpoint_from_before_the_position_gaussian_loads_and_scores_without_it(
    finished_run: FinishedRun, tmp_path: Path,
) -> None:
    """A checkpoint written before ``position_gaussian_weight`` (and the patch memory) existed has
    neither the fields nor their buffers: it loads, and scores with the flow map it was evaluated with."""
    checkpoint, state = load_run_checkpoint(finished_run.checkpoint(1))
    config = checkpoint["hyper_parameters"]["config"]
    assert config["scoring"]["position_gaussian_weight"] > 0
    for group, name in (("scoring", "position_gaussian_weight"), ("scoring", "patch_memory_size"),
                        ("scoring", "patch_memory_weight"), ("routing", "router"), ("routing", "router_memory_size")):  # fmt: skip
        del config[group][name]
    checkpoint["state_dict"] = {
        k: v for k, v in checkpoint["state_dict"].items() if "position_gaussian" not in k and "patch_memory" not in k
    }
    del checkpoint["anomalib_moleflow_continual"], checkpoint["run_state"], checkpoint["checksum"]
    path = save_run_checkpoint(tmp_path / "older.ckpt", state, checkpoint)

    older = MoLEFlow.from_checkpoint(path)
    current = MoLEFlow.from_checkpoint(finished_run.checkpoint(1))
    assert older.model.position_gaussian is None and current.model.position_gaussian is not None
    assert older.model.patch_memory is None and older.model.config.routing.router == "prototype"
    features = current.model.extract_features(torch.rand(2, 3, 64, 64))
    with torch.no_grad():
        flow_only = older.model.score_features(features, "0").anomaly_map
        with_gaussian = current.model.score_features(features, "0").anomaly_map
        gaussian = current.model.position_gaussian("0", features)
        flow_map = current.model.anomaly_map_generator(current.model.patch_scores(features, "0"))
    torch.testing.assert_close(flow_only, flow_map, rtol=1e-6, atol=1e-5)  # the Gaussian adds ~10-100
    assert not torch.equal(flow_only, with_gaussian) and float(gaussian.min()) > 0


def test_resume_restores_the_ogp_state(
    finished_run: FinishedRun, copied_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``use_ogp`` the callback's bases come back from the checkpoint a run resumes from."""
    _no_training(monkeypatch)
    last = copied_run / "checkpoints" / finished_run.checkpoint(1).name
    checkpoint, state = load_run_checkpoint(last)
    basis = torch.linalg.qr(torch.randn(6, 2, generator=torch.Generator().manual_seed(0))).Q
    checkpoint["ogp"] = {"bases": {"spatial_mixer.kernel_logits": basis}, "ranks": {"spatial_mixer.kernel_logits": [2]}, "n_tasks": 1}
    del checkpoint[FORMAT_KEY], checkpoint["run_state"], checkpoint["checksum"]
    save_run_checkpoint(last, state, checkpoint)
    stream = TaskStream(list(TASKS), root=str(finished_run.root), train_batch_size=8, eval_batch_size=8, num_workers=0)
    runner = ContinualRunner(
        finished_run.config, stream, TrainerOptions(max_epochs=1), RunOptions(output_dir=str(copied_run), use_ogp=True)
    )
    runner.run(resume=True)
    assert runner.ogp is not None and runner.ogp.n_tasks == 1
    assert runner.ogp.ranks == {"spatial_mixer.kernel_logits": [2]}
    assert torch.equal(runner.ogp.bases["spatial_mixer.kernel_logits"], basis)


def test_output_folder_that_refuses_writes_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only folder (what chmod 555 gives a normal user): refused with the folder named."""
    import errno

    from anomalib_moleflow.continual.runner import _check_writable

    def refuse(self: Path, data: bytes) -> int:
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "write_bytes", refuse)
    with pytest.raises(PermissionError, match=r"cannot write to the output folder '.*run': Permission denied"):
        _check_writable(tmp_path / "run")
    monkeypatch.undo()
    _check_writable(tmp_path / "run")  # a writable folder passes and keeps no probe file
    assert list((tmp_path / "run").iterdir()) == []


# ----------------------------------------------------------------------------- thresholds
def test_thresholds_recorded_with_the_split_that_fitted_them(finished_run: FinishedRun) -> None:
    data = finished_run.runner.results.to_dict()
    model = finished_run.runner.model
    for index, name in enumerate(TASKS):
        values = data["thresholds"][name]
        stored = model.model.thresholds.values(str(index))
        assert values["image_threshold"] == pytest.approx(stored["image_threshold"])
        assert values["pixel_threshold"] == pytest.approx(stored["pixel_threshold"])  # the test split has masks
        assert values["image_threshold_normalized"] == values["pixel_threshold_normalized"] == 0.5
        assert values["fitted_on"] == finished_run.runner.stream.threshold_split
        assert "test split" in values["fitted_on"]


def test_threshold_holdout_fits_thresholds_on_held_out_training_images(
    stream_root: Path, tiny_config: MoLEFlowConfig, tmp_path: Path
) -> None:
    stream = TaskStream(
        [TASKS[0]], root=str(stream_root), train_batch_size=8, eval_batch_size=8, num_workers=0, seed=5,
        threshold_holdout=0.25,
    )  # fmt: skip
    runner = ContinualRunner(tiny_config, stream, TrainerOptions(max_epochs=1), RunOptions(output_dir=str(tmp_path)))
    values = runner.run().to_dict()["thresholds"][TASKS[0]]
    assert values["fitted_on"] == stream.threshold_split and "held out of its training" in values["fitted_on"]
    assert values["pixel_threshold"] is None and values["pixel_threshold_normalized"] is None  # no masks
    datamodule = stream.datamodule(0)  # the same seeded split as in training
    datamodule.setup()
    held = [Path(p) for p in datamodule.val_data.samples.image_path]
    assert len(held) == 5 and all(p.parent == stream_root / TASKS[0] / "train" / "good" for p in held)
    assert not set(map(str, held)) & set(datamodule.train_data.samples.image_path)
    model = runner.model
    with torch.no_grad(), model.model.oracle("0"), model.model.raw_scores():
        images = model.prepare_images(torch.stack([read_image(p) for p in held]))
        scores = model.model.predict_features(model.model.extract_features(images)).pred_score
    assert values["image_threshold"] == pytest.approx(float(torch.quantile(scores.double(), 0.99)), rel=1e-4)
