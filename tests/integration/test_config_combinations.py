"""Settings that cannot go together: unknown keys are errors wherever a config is read (dicts, YAML
files, the command line), the one combination the notes resolve (whitening + multi-scale context) is
resolved the same way with a warning, and a combination without meaning is rejected with a message."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from anomalib_moleflow.cli import build_parser, continual_parser, main
from anomalib_moleflow.models.moleflow import MoLEFlowConfig
from anomalib_moleflow.models.moleflow.config import MS_CONTEXT_DROPPED


def _preset(tmp_path: Path, model_config: dict, name: str = "preset.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"model": {"config": model_config}}))
    return path


# ----------------------------------------------------------------------------- unknown keys
@pytest.mark.parametrize(
    ("model_config", "named"),
    [
        ({"flow": {"use_ms_contxt": True}}, "use_ms_contxt"),
        ({"flw": {"use_context": False}}, "flw"),
        ({"experts": {"n_coupling_blocks": 2}}, "n_coupling_blocks"),  # a real field, in the wrong group
    ],
)
def test_unknown_key_in_a_preset_file_is_an_argument_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model_config: dict, named: str
) -> None:
    code = main(["continual", "--data.tasks", "[bottle]", "--config", str(_preset(tmp_path, model_config))])
    assert code == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_unknown_top_level_key_in_a_preset_file_is_an_argument_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump({"runn": {"use_ogp": True}}))
    assert main(["continual", "--data.tasks", "[bottle]", "--config", str(path)]) == 2
    assert "runn" in capsys.readouterr().err


@pytest.mark.parametrize("data", [{"flow": {"use_ms_contxt": True}}, {"use_ms_contxt": True}])
def test_unknown_key_in_a_dict_is_named(data: dict) -> None:
    with pytest.raises(ValueError, match="use_ms_contxt"):
        MoLEFlowConfig.from_dict(data)
    with pytest.raises(ValueError, match="use_ms_contxt"):
        MoLEFlowConfig().updated({"flow.use_ms_contxt": True})


# ----------------------------------------------------------------------------- whitening + MS context
def test_whitening_plus_ms_context_warns_and_drops_ms_context() -> None:
    with pytest.warns(UserWarning, match="multi-scale context is dropped") as caught:
        cfg = MoLEFlowConfig.from_dict({"flow": {"use_ms_context": True}, "experts": {"input_adapter": "whitening"}})
    assert str(caught[0].message) == MS_CONTEXT_DROPPED
    assert cfg.flow.use_ms_context and not cfg.effective_ms_context  # the request is kept (and saved), not built


@pytest.mark.parametrize("adapter", ["film", "none"])
def test_ms_context_without_whitening_stays_without_a_warning(adapter: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = MoLEFlowConfig.from_dict({"flow": {"use_ms_context": True}, "experts": {"input_adapter": adapter}})
        MoLEFlowConfig()  # the defaults (whitening, no MS context) do not warn either
    assert cfg.effective_ms_context


def test_whitening_plus_ms_context_from_the_command_line_warns(tmp_path: Path) -> None:
    preset = _preset(tmp_path, {"flow": {"use_ms_context": True}})  # whitening is the default adapter
    cfg = build_parser().parse_args(["continual", "--data.tasks", "[bottle]", "--config", str(preset)])
    with pytest.warns(UserWarning, match="multi-scale context is dropped"):
        init = continual_parser().instantiate_classes(cfg.continual)
    assert not init.model.config.effective_ms_context


def test_a_built_model_has_no_ms_context_under_whitening() -> None:
    from helpers import tiny_config

    from anomalib_moleflow.models.moleflow.torch_model import MoLEFlowModel

    with pytest.warns(UserWarning, match="multi-scale context is dropped"):
        config = tiny_config(**{"flow.use_ms_context": True})
    assert MoLEFlowModel(config).ms_context is None


# ----------------------------------------------------------------------------- rejected
def test_context_gate_without_context_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"flow\.use_context_gate must go with flow\.use_context=True"):
        MoLEFlowConfig.from_dict({"flow": {"use_context": False, "use_context_gate": True}})
    MoLEFlowConfig.from_dict({"flow": {"use_context": True, "use_context_gate": True}})  # Baseline 2.0
    MoLEFlowConfig.from_dict({"flow": {"use_context": False}})


def test_context_gate_without_context_is_a_one_line_cli_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    preset = _preset(tmp_path, {"flow": {"use_context": False, "use_context_gate": True}})
    code = main(["continual", "--data.tasks", "[bottle]", "--data.root", str(tmp_path), "--config", str(preset)])
    assert code == 1
    err = capsys.readouterr().err
    assert "flow.use_context_gate" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
