"""What a MoLE-Flow checkpoint holds, for every format the project has written.

* **Lightning / anomalib** (``anomalib fit``, and continual checkpoints from format 2 on): the
  module's ``state_dict``, ``hyper_parameters`` with ``config`` (grouped dict; a flat dict
  before the groups) and ``normalize_scores``, plus anomalib's component settings. Continual
  checkpoints add their run's keys (:mod:`anomalib_moleflow.continual.run_checkpoint`).
* **Continual format 1**: ``model_config`` (flat), ``state_dict`` and ``task_keys`` at the top
  level; scores were normalised per task.

:func:`saved_settings` reads how to rebuild the model from any of them;
``MoLEFlow.from_checkpoint`` is the one loader built on it. :func:`lightning_checkpoint` gives
format 1 the Lightning keys, for anomalib's commands.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning

from anomalib_moleflow.io import CheckpointError

from .config import MoLEFlowConfig


@dataclass(frozen=True)
class SavedSettings:
    """How a checkpoint's model was built."""

    config: MoLEFlowConfig
    normalize_scores: bool
    has_post_processor: bool


def saved_settings(checkpoint: dict[str, Any], source: object = "checkpoint") -> SavedSettings:
    """The model settings of ``checkpoint`` (any format); ``CheckpointError`` naming ``source`` if
    it holds no MoLE-Flow model."""
    state_dict = checkpoint.get("state_dict")
    if not isinstance(state_dict, dict):
        msg = f"'{source}' holds no 'state_dict': not a MoLE-Flow checkpoint."
        raise CheckpointError(msg)
    has_post = any(k.startswith("post_processor.") for k in state_dict)
    try:
        if isinstance(checkpoint.get("hyper_parameters"), dict) and "config" in checkpoint["hyper_parameters"]:
            hparams = checkpoint["hyper_parameters"]
            config = MoLEFlowConfig.from_saved(hparams["config"] or {})
            return SavedSettings(config, bool(hparams.get("normalize_scores", False)), has_post)
        if isinstance(checkpoint.get("model_config"), dict):  # continual format 1
            return SavedSettings(MoLEFlowConfig.from_saved(checkpoint["model_config"]), True, has_post)
    except (TypeError, ValueError) as exc:
        msg = f"'{source}' holds a MoLE-Flow configuration this version cannot read: {exc}"
        raise CheckpointError(msg) from exc
    msg = f"'{source}' holds no MoLE-Flow configuration (no hyper_parameters.config or model_config)."
    raise CheckpointError(msg)


def lightning_checkpoint(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """``checkpoint`` in the form Lightning's loader reads (``anomalib test|predict --ckpt_path``):
    unchanged when it has the Lightning keys; a continual checkpoint of format 1 gets them (its
    settings as ``hyper_parameters``, and the state of the post-processor of per-task normalised
    scores, which format 1 did not store)."""
    if "pytorch-lightning_version" in checkpoint or not isinstance(checkpoint.get("model_config"), dict):
        return checkpoint
    from .post_processing import normalized_score_post_processor

    settings = saved_settings(checkpoint)
    state_dict = dict(checkpoint["state_dict"])
    for name, value in normalized_score_post_processor().state_dict().items():
        state_dict.setdefault(f"post_processor.{name}", value)
    return {**checkpoint, **model_checkpoint(state_dict, settings.config, settings.normalize_scores)}


def model_checkpoint(state_dict: dict[str, Any], config: MoLEFlowConfig, normalize_scores: bool) -> dict[str, Any]:
    """A checkpoint dict that Lightning, anomalib and ``MoLEFlow.from_checkpoint`` all load."""
    return {
        "pytorch-lightning_version": lightning.__version__,
        "state_dict": state_dict,
        "hyper_parameters": {"config": config.to_dict(), "normalize_scores": normalize_scores},
    }
