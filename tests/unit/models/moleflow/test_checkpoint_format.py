"""What a MoLE-Flow checkpoint holds, for every format the project has written: the settings
:func:`saved_settings` reads, the errors on other files, and :func:`model_checkpoint`'s round trip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import differing_keys

from anomalib_moleflow.io import CheckpointError
from anomalib_moleflow.models.moleflow import MoLEFlow, MoLEFlowConfig
from anomalib_moleflow.models.moleflow.checkpoint_format import (
    SavedSettings,
    lightning_checkpoint,
    model_checkpoint,
    saved_settings,
)

FLAT_LEGACY = {"backbone": "tf_efficientnet_lite0", "image_size": 64, "lora_rank": 2, "n_coupling_blocks": 2}
"""A flat config as written before the groups, and before grid pooling, global score and position Gaussian."""

LEGACY_VALUES = {"grid_downsample": 1, "global_score_weight": 0.0, "position_gaussian_weight": 0.0, "patch_memory_size": 0, "router": "prototype", "prototype_metric": "mahalanobis"}


def _lightning(config: dict[str, Any] | None, post: bool = False, **hparams: Any) -> dict[str, Any]:  # noqa: ANN401
    """A Lightning / anomalib checkpoint dict with ``hyper_parameters.config = config``."""
    state = {"model.flow.weight": torch.zeros(1)}
    if post:
        state["post_processor._image_threshold"] = torch.tensor(0.5)
    return {"state_dict": state, "hyper_parameters": {"config": config, **hparams}}


def test_lightning_checkpoint_with_a_grouped_config(tiny_config: MoLEFlowConfig) -> None:
    settings = saved_settings(_lightning(tiny_config.to_dict(), post=True, normalize_scores=True))
    assert settings == SavedSettings(tiny_config, normalize_scores=True, has_post_processor=True)
    plain = saved_settings(_lightning(tiny_config.to_dict()))
    assert plain.config == tiny_config
    assert plain.normalize_scores is False  # absent: anomalib's own post-processing
    assert plain.has_post_processor is False


def test_lightning_checkpoint_with_a_flat_legacy_config() -> None:
    settings = saved_settings(_lightning(FLAT_LEGACY))
    assert settings.config == MoLEFlowConfig.from_dict(FLAT_LEGACY).updated(LEGACY_VALUES)
    assert settings.config.features.grid_downsample == 1  # how those models were trained
    assert settings.config.scoring.global_score_weight == 0.0
    assert settings.config.scoring.position_gaussian_weight == 0.0
    assert settings.normalize_scores is False
    empty = saved_settings(_lightning(None))  # the default model of the time
    assert empty.config == MoLEFlowConfig().updated(LEGACY_VALUES)


def test_continual_format_1_checkpoint() -> None:
    checkpoint = {"state_dict": {"flow.weight": torch.zeros(1)}, "model_config": FLAT_LEGACY, "task_keys": ["0", "1"]}
    settings = saved_settings(checkpoint)
    assert settings.config == MoLEFlowConfig.from_dict(FLAT_LEGACY).updated(LEGACY_VALUES)
    assert settings.normalize_scores is True  # continual models scored each task on its own scale
    assert settings.has_post_processor is False
    # the Lightning hyper-parameters win when both are present
    both = {**_lightning(FLAT_LEGACY | {"lora_rank": 8}), "model_config": FLAT_LEGACY}
    assert saved_settings(both).config.experts.lora_rank == 8


@pytest.mark.parametrize(
    ("checkpoint", "message"),
    [
        ({"weights": {}}, "holds no 'state_dict': not a MoLE-Flow checkpoint"),
        ({"state_dict": [1, 2]}, "holds no 'state_dict'"),
        ({"state_dict": {}}, r"holds no MoLE-Flow configuration \(no hyper_parameters.config or model_config\)"),
        ({"state_dict": {}, "hyper_parameters": {"lr": 0.1}}, "holds no MoLE-Flow configuration"),
        ({"state_dict": {}, "hyper_parameters": "config"}, "holds no MoLE-Flow configuration"),
        ({"state_dict": {}, "model_config": "flat"}, "holds no MoLE-Flow configuration"),
        (_lightning({"lora_rnak": 4}), "holds a MoLE-Flow configuration this version cannot read: .*lora_rnak"),
        (_lightning({"experts": {"lora_rank": 0}}), "holds a MoLE-Flow configuration this version cannot read: .*experts.lora_rank must be >= 1"),
        (_lightning({"flow": 3}), r"holds a MoLE-Flow configuration this version cannot read: MoLEFlowConfig\.flow must be a FlowConfig"),
        ({"state_dict": {}, "model_config": {"bogus": 1}}, "holds a MoLE-Flow configuration this version cannot read: .*bogus"),
    ],
)
def test_other_files_raise_checkpoint_error_naming_the_source(checkpoint: dict[str, Any], message: str) -> None:
    with pytest.raises(CheckpointError, match=f"^'runs/x.ckpt' {message}"):
        saved_settings(checkpoint, Path("runs/x.ckpt"))
    with pytest.raises(CheckpointError, match="'checkpoint'"):
        saved_settings(checkpoint)
    assert issubclass(CheckpointError, ValueError)


def test_model_checkpoint_is_plain_data_lightning_and_from_checkpoint_load(tiny_config: MoLEFlowConfig, tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = MoLEFlow(tiny_config, evaluator=False, visualizer=False)
    module.add_task("bottle")
    module.add_task("cable")
    for layer in module.model.flow.lora_layers():  # give expert "1" weights of its own
        torch.nn.init.normal_(layer.task_bias["1"], std=0.1)
    checkpoint = model_checkpoint(module.state_dict(), tiny_config, normalize_scores=True)
    assert checkpoint["hyper_parameters"] == {"config": tiny_config.to_dict(), "normalize_scores": True}
    assert saved_settings(checkpoint) == SavedSettings(tiny_config, True, has_post_processor=True)
    path = tmp_path / "model.ckpt"
    torch.save(checkpoint, path)
    assert torch.load(path, weights_only=True)["hyper_parameters"] == checkpoint["hyper_parameters"]

    loaded = MoLEFlow.from_checkpoint(path, evaluator=False, visualizer=False)
    assert not loaded.training
    assert loaded.config == tiny_config and loaded.normalize_scores and loaded.model.normalizes_scores
    assert loaded.model.task_keys == ["0", "1"] and loaded.model.task_names == ["bottle", "cable"]
    assert loaded.model.active_task == "1"
    assert differing_keys(loaded.state_dict(), module.state_dict()) == []
    lightning = MoLEFlow.load_from_checkpoint(path)
    assert lightning.model.task_names == ["bottle", "cable"]
    assert differing_keys(lightning.model.state_dict(), module.model.state_dict()) == []
    raw = model_checkpoint(module.state_dict(), tiny_config, normalize_scores=False)
    torch.save(raw, path)
    assert MoLEFlow.from_checkpoint(path).normalize_scores is False


def test_lightning_checkpoint_gives_format_1_the_lightning_keys(tiny_config: MoLEFlowConfig) -> None:
    lightning = model_checkpoint({"model.flow.weight": torch.zeros(1)}, tiny_config, normalize_scores=True)
    assert lightning_checkpoint(lightning) is lightning  # already readable: unchanged
    other = {"state_dict": {}}
    assert lightning_checkpoint(other) is other  # not ours: Lightning reports it
    format_1 = {"anomalib_moleflow_continual": 1, "model_config": FLAT_LEGACY, "task_keys": ["0", "1"],
                "state_dict": {"model.flow.weight": torch.ones(1)}}  # fmt: skip
    converted = lightning_checkpoint(format_1)
    assert "pytorch-lightning_version" in converted and converted["task_keys"] == ["0", "1"]
    assert converted["hyper_parameters"]["config"] == saved_settings(format_1).config.to_dict()
    assert converted["hyper_parameters"]["normalize_scores"] is True
    state = converted["state_dict"]
    assert torch.equal(state["model.flow.weight"], torch.ones(1))
    assert float(state["post_processor._image_threshold"]) == 0.5 and float(state["post_processor.image_max"]) == 1.0
    assert "post_processor.image_min" not in format_1["state_dict"]  # the input is left as it was
