"""The one configuration object."""

import pytest

from anomalib_moleflow.models.moleflow.config import MoLEFlowConfig


def test_roundtrip_through_plain_dict() -> None:
    cfg = MoLEFlowConfig(lora_rank=8, layers=(1, 2))
    data = cfg.to_dict()
    assert data["layers"] == [1, 2]
    assert MoLEFlowConfig.from_dict(data) == cfg


def test_unknown_field_is_named() -> None:
    with pytest.raises(ValueError, match="lora_rnak"):
        MoLEFlowConfig.from_dict({"lora_rnak": 4})


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [("lora_rank", 0, "lora_rank"), ("context_kernel", 4, "odd"), ("tail_weight", 1.5, "tail_weight"),
     ("input_adapter", "bogus", "input_adapter"), ("whitening_gamma_range", (1.2, 2.0), "gamma_range")],
)
def test_bad_values_name_the_field(field: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MoLEFlowConfig(**{field: value})


def test_whitening_plus_ms_context_drops_ms_context() -> None:
    assert not MoLEFlowConfig(use_ms_context=True).effective_ms_context
    assert MoLEFlowConfig(use_ms_context=True, input_adapter="none").effective_ms_context
