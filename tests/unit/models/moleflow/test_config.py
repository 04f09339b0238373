"""The one configuration object, in groups: validation messages, the dict forms it reads (nested,
flat legacy, mixed), what older checkpoints' configs get for fields they predate, and copies."""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import fields
from typing import Any

import pytest

from anomalib_moleflow.models.moleflow.config import (
    FIELD_GROUPS,
    MS_CONTEXT_DROPPED,
    MS_CONTEXT_FORCED,
    ExpertConfig,
    FeatureConfig,
    FlowConfig,
    LossConfig,
    MoLEFlowConfig,
    OptimConfig,
    RoutingConfig,
    ScoringConfig,
)

GROUPS = {
    "features": FeatureConfig,
    "flow": FlowConfig,
    "experts": ExpertConfig,
    "loss": LossConfig,
    "routing": RoutingConfig,
    "scoring": ScoringConfig,
    "optim": OptimConfig,
}


# ----------------------------------------------------------------------------- groups
def test_groups_and_their_fields() -> None:
    cfg = MoLEFlowConfig()
    assert [f.name for f in fields(MoLEFlowConfig)] == list(GROUPS)
    for group, cls in GROUPS.items():
        assert isinstance(getattr(cfg, group), cls)
    # every field name is unique across the groups, so a flat name says which group it belongs to
    names = [f.name for cls in GROUPS.values() for f in fields(cls)]
    assert len(names) == len(set(names)) == len(FIELD_GROUPS)
    assert FIELD_GROUPS["lora_rank"] == "experts"
    assert FIELD_GROUPS["n_coupling_blocks"] == "flow"
    assert FIELD_GROUPS["grid_downsample"] == "features"
    assert FIELD_GROUPS["unknown_threshold"] == "routing"
    assert FIELD_GROUPS["position_gaussian_weight"] == "scoring"


def test_groups_given_as_dicts_become_their_dataclasses() -> None:
    cfg = MoLEFlowConfig(experts={"lora_rank": 4}, flow=FlowConfig(n_coupling_blocks=3))
    assert isinstance(cfg.experts, ExpertConfig)
    assert cfg.experts.lora_rank == 4
    assert cfg.experts.lora_alpha == ExpertConfig().lora_alpha  # the rest keep their defaults
    assert cfg.flow.n_coupling_blocks == 3


def test_a_group_of_the_wrong_type_is_named() -> None:
    with pytest.raises(TypeError, match=r"MoLEFlowConfig\.flow must be a FlowConfig or a dict"):
        MoLEFlowConfig(flow=3)  # type: ignore[arg-type]


def test_sequences_are_stored_as_tuples() -> None:
    cfg = MoLEFlowConfig.from_dict({
        "features": {"layers": [1, 2]},
        "flow": {"ms_context_dilations": [1, 3]},
        "experts": {"whitening_gamma_range": [0.25, 4]},
        "scoring": {"global_score_layers": [3, 4]},
    })
    assert cfg.features.layers == (1, 2)
    assert cfg.flow.ms_context_dilations == (1, 3)
    assert cfg.experts.whitening_gamma_range == (0.25, 4.0)
    assert cfg.scoring.global_score_layers == (3, 4)
    assert all(isinstance(v, tuple) for v in (cfg.features.layers, cfg.flow.ms_context_dilations))


# ----------------------------------------------------------------------------- validation
BAD_VALUES = [
    ("routing", "router_patch_quantile", 0.0, "be in (0, 1]"),
    ("routing", "router_patch_quantile", 1.5, "be in (0, 1]"),
    ("features", "image_size", 0, "be >= 1"),
    ("features", "feature_aggregation_kernel", 2, "be odd"),
    ("features", "grid_downsample", 0, "be >= 1"),
    ("features", "layers", (), "name at least one backbone stage"),
    ("flow", "n_coupling_blocks", 0, "be >= 1"),
    ("flow", "context_kernel", 4, "be odd"),
    ("flow", "spatial_mixer_kernel", 2, "be odd"),
    ("experts", "lora_rank", 0, "be >= 1"),
    ("experts", "dia_n_blocks", 0, "be >= 1"),
    ("experts", "whitening_gamma_range", (1.2, 2.0), "satisfy 0 < low < 1 < high"),
    ("experts", "whitening_gamma_range", (0.5, 0.9), "satisfy 0 < low < 1 < high"),
    ("experts", "input_adapter", "bogus", "be one of 'whitening', 'film', 'instance_norm_mlp', 'none'"),
    ("flow", "ms_context_kind", "per_task", "be one of 'shared', 'task_conditioned'"),
    ("experts", "lora_scaling", "alpha", "be one of"),
    ("experts", "lora_kind", "positional", "be one of 'standard', 'spatial_contextual'"),
    ("experts", "sc_lora_grid_size", 0, "be >= 1"),
    ("loss", "tail_weight", 1.5, "be in [0, 1]"),
    ("loss", "tail_weight", -0.1, "be in [0, 1]"),
    ("loss", "tail_top_ratio", 0.0, "be in (0, 1]"),
    ("routing", "router", "nearest", "be one of 'memory', 'prototype', 'hybrid', 'none'"),
    ("routing", "router_top_k", 0, "be >= 1"),
    ("routing", "prototype_metric", "cosine", "be one of 'auto', 'mahalanobis', 'euclidean'"),
    ("scoring", "score_top_k", 0, "be >= 1"),
    ("scoring", "global_score_weight", -1.0, "be >= 0"),
    ("scoring", "position_gaussian_weight", -0.5, "be >= 0"),
    ("scoring", "position_gaussian_shrinkage", -0.1, "be >= 0"),
]


@pytest.mark.parametrize(("group", "name", "value", "requirement"), BAD_VALUES)
def test_bad_values_name_group_and_field(group: str, name: str, value: object, requirement: str) -> None:
    expected = re.escape(f"MoLEFlowConfig.{group}.{name} must {requirement}")
    with pytest.raises(ValueError, match=expected):
        MoLEFlowConfig.from_dict({group: {name: value}})
    with pytest.raises(ValueError, match=expected):  # a group dataclass is validated as well
        MoLEFlowConfig(**{group: GROUPS[group](**{name: value})})
    with pytest.raises(ValueError, match=expected):  # ... and a copy with the bad value
        MoLEFlowConfig().updated({f"{group}.{name}": value})


def test_limits_themselves_are_accepted() -> None:
    cfg = MoLEFlowConfig.from_dict({
        "loss": {"tail_weight": 0.0, "tail_top_ratio": 1.0},
        "scoring": {"global_score_weight": 0.0, "position_gaussian_weight": 0.0},
        "features": {"feature_aggregation_kernel": 1, "grid_downsample": 1},
        "routing": {"router": "none", "router_top_k": 1},
    })
    assert cfg.loss.tail_weight == 0.0 and cfg.routing.router == "none"
    assert MoLEFlowConfig.from_dict({"loss": {"tail_weight": 1.0}}).loss.tail_weight == 1.0


@pytest.mark.parametrize(
    ("router", "metric", "resolved"),
    [("memory", "auto", "euclidean"), ("hybrid", "auto", "euclidean"), ("prototype", "auto", "mahalanobis"),
     ("prototype", "euclidean", "euclidean"), ("memory", "mahalanobis", "mahalanobis")],
)  # fmt: skip
def test_auto_prototype_metric_is_mahalanobis_only_for_the_prototype_router(router: str, metric: str, resolved: str) -> None:
    cfg = MoLEFlowConfig.from_dict({"routing": {"router": router, "prototype_metric": metric}})
    assert cfg.routing.resolved_prototype_metric == resolved


def test_whitening_plus_ms_context_drops_ms_context() -> None:
    assert not MoLEFlowConfig().effective_ms_context
    assert not MoLEFlowConfig.from_dict({"flow": {"use_ms_context": True}}).effective_ms_context
    for adapter in ("none", "film"):
        cfg = MoLEFlowConfig.from_dict({"flow": {"use_ms_context": True}, "experts": {"input_adapter": adapter}})
        assert cfg.effective_ms_context


def test_force_ms_context_keeps_it_with_whitening_and_warns_of_the_collapse() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dropped = MoLEFlowConfig.from_dict({"flow": {"use_ms_context": True}})
        forced = MoLEFlowConfig.from_dict({"flow": {"use_ms_context": True, "force_ms_context": True}})
    assert [str(w.message) for w in caught] == [MS_CONTEXT_DROPPED, MS_CONTEXT_FORCED]
    assert "force_ms_context" in MS_CONTEXT_FORCED and "collapse" in MS_CONTEXT_FORCED and "0.4471" in MS_CONTEXT_FORCED
    assert not dropped.effective_ms_context and forced.effective_ms_context
    assert not MoLEFlowConfig().flow.force_ms_context
    assert MoLEFlowConfig.from_dict(forced.to_dict()) == forced
    with warnings.catch_warnings(record=True) as caught:  # no conflict with FiLM: no warning, nothing changes
        warnings.simplefilter("always")
        film = MoLEFlowConfig.from_dict({"flow": {"use_ms_context": True, "force_ms_context": True}, "experts": {"input_adapter": "film"}})
    assert film.effective_ms_context and not caught


DEPENDENT_BAD_VALUES = [
    ({"force_ms_context": True}, "flow.force_ms_context", "go with flow.use_ms_context=True"),
    ({"ms_context_kind": "task_conditioned"}, "flow.ms_context_kind", "be 'shared' unless flow.use_ms_context=True"),
    ({"use_neighborhood_context": True, "use_context": False}, "flow.use_neighborhood_context", "go with flow.use_context=True"),
    ({"use_neighborhood_context": True, "neighborhood_kernel": 4}, "flow.neighborhood_kernel", "be odd"),
    ({"use_neighborhood_context": True, "neighborhood_kernel": 0}, "flow.neighborhood_kernel", "be >= 1"),
    ({"use_neighborhood_context": True, "neighborhood_gate": 1.5}, "flow.neighborhood_gate", "be in [0, 1]"),
    ({"use_patch_attention": True, "patch_attention_hidden": 0}, "flow.patch_attention_hidden", "be >= 1"),
    ({"use_patch_attention": True, "patch_attention_dropout": 1.0}, "flow.patch_attention_dropout", "be in [0, 1)"),
    ({"use_cpcf": True, "use_context": False}, "flow.use_cpcf", "go with flow.use_context=True"),
    ({"use_cpcf": True, "use_context_gate": True}, "flow.use_cpcf", "go with flow.use_context_gate=False"),
    ({"cpcf_use_attention": True}, "flow.cpcf_use_attention", "go with flow.use_cpcf=True"),
    (
        {"use_cpcf": True, "cpcf_use_attention": True, "use_neighborhood_context": True},
        "flow.cpcf_use_attention",
        "go with flow.use_neighborhood_context=False",
    ),
]


def test_cpcf_and_sc_lora_options_and_their_defaults() -> None:
    cfg = MoLEFlowConfig()
    assert (cfg.flow.use_cpcf, cfg.flow.cpcf_use_attention) == (False, False)
    assert (cfg.experts.lora_kind, cfg.experts.sc_lora_grid_size) == ("standard", 4)
    on = MoLEFlowConfig.from_dict({
        "flow": {"use_cpcf": True, "cpcf_use_attention": True},
        "experts": {"lora_kind": "spatial_contextual", "sc_lora_grid_size": 1},
    })
    assert MoLEFlowConfig.from_dict(on.to_dict()) == on
    assert MoLEFlowConfig.from_dict({"flow": {"use_cpcf": True, "use_neighborhood_context": True}}).flow.use_cpcf  # v4.1


@pytest.mark.parametrize(("flow", "name", "requirement"), DEPENDENT_BAD_VALUES)
def test_version_module_settings_are_checked_when_their_module_is_on(flow: dict[str, Any], name: str, requirement: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"MoLEFlowConfig.{name} must {requirement}")):
        MoLEFlowConfig.from_dict({"flow": flow})


def test_version_module_options_and_their_defaults() -> None:
    flow = MoLEFlowConfig().flow
    assert (flow.ms_context_kind, flow.use_neighborhood_context, flow.use_patch_attention) == ("shared", False, False)
    assert (flow.neighborhood_gate, flow.neighborhood_kernel, flow.patch_attention_hidden) == (0.3, 3, 256)  # v4.1, v6
    cfg = MoLEFlowConfig.from_dict({
        "flow": {"use_ms_context": True, "ms_context_kind": "task_conditioned", "use_neighborhood_context": True, "use_patch_attention": True},
        "experts": {"input_adapter": "instance_norm_mlp"},
    })
    assert cfg.effective_ms_context and cfg.experts.input_adapter == "instance_norm_mlp"
    assert MoLEFlowConfig.from_dict(cfg.to_dict()) == cfg


# ----------------------------------------------------------------------------- dict forms
def test_to_dict_round_trip_is_plain_json() -> None:
    cfg = MoLEFlowConfig.from_dict({"experts": {"lora_rank": 8}, "features": {"layers": (1, 2)}, "routing": {"unknown_threshold": 2.5}})
    data = cfg.to_dict()
    assert list(data) == list(GROUPS)
    assert data["features"]["layers"] == [1, 2]
    assert data["experts"]["whitening_gamma_range"] == [0.5, 2.0]
    assert json.loads(json.dumps(data)) == data  # plain data: safe under torch.load(weights_only=True)
    assert MoLEFlowConfig.from_dict(data) == cfg
    assert MoLEFlowConfig.from_dict(json.loads(json.dumps(data))) == cfg
    assert MoLEFlowConfig.from_dict({}) == MoLEFlowConfig()


def test_from_dict_takes_the_flat_names_of_older_configs() -> None:
    cfg = MoLEFlowConfig.from_dict({"lora_rank": 16, "n_coupling_blocks": 4, "layers": [1, 2], "router": "hybrid"})
    assert cfg.experts.lora_rank == 16
    assert cfg.flow.n_coupling_blocks == 4
    assert cfg.features.layers == (1, 2)
    assert cfg.routing.router == "hybrid"
    expected = MoLEFlowConfig.from_dict({
        "experts": {"lora_rank": 16},
        "flow": {"n_coupling_blocks": 4},
        "features": {"layers": (1, 2)},
        "routing": {"router": "hybrid"},
    })
    assert cfg == expected
    # a whole flat dict of every field, as the checkpoints written before the groups hold
    flat = {name: value for group in MoLEFlowConfig().to_dict().values() for name, value in group.items()}
    flat["lora_rank"] = 7
    assert MoLEFlowConfig.from_dict(flat) == MoLEFlowConfig().updated({"lora_rank": 7})


def test_from_dict_takes_a_mix_of_nested_and_flat_names() -> None:
    cfg = MoLEFlowConfig.from_dict({"experts": {"lora_rank": 4}, "lora_alpha": 2.0, "flow": {"clamp": 1.5}, "lr": 1e-3})
    assert cfg.experts.lora_rank == 4
    assert cfg.experts.lora_alpha == 2.0
    assert cfg.flow.clamp == 1.5
    assert cfg.optim.lr == 1e-3
    # a flat name next to a group given as its dataclass changes that group
    mixed = MoLEFlowConfig.from_dict({"experts": ExpertConfig(lora_rank=4), "lora_alpha": 3.0})
    assert (mixed.experts.lora_rank, mixed.experts.lora_alpha) == (4, 3.0)


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"lora_rnak": 4}, "lora_rnak"),
        ({"experts": {"lora_rnak": 4}}, "lora_rnak"),
        ({"flow": {"lora_rank": 4}}, "lora_rank"),  # a real field, in the wrong group
        ({"optimiser": {"lr": 1.0}}, "optimiser"),
        ({"lora_rank": 4, "bogus_a": 1, "bogus_b": 2}, "bogus_a, bogus_b"),
    ],
)
def test_unknown_keys_are_named(data: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=re.escape(named)):
        MoLEFlowConfig.from_dict(data)


def test_unknown_group_field_message_lists_the_group() -> None:
    with pytest.raises(ValueError, match=r"Unknown MoLEFlowConfig\.experts field\(s\): lora_rnak; experts has .*lora_rank"):
        MoLEFlowConfig.from_dict({"experts": {"lora_rnak": 4}})


# ----------------------------------------------------------------------------- saved configs
LEGACY_ABSENT = {
    "grid_downsample": 1,
    "global_score_weight": 0.0,
    "position_gaussian_weight": 0.0,
    "patch_memory_size": 0,
    "router": "prototype",
    "prototype_metric": "mahalanobis",
}


def test_from_saved_fills_fields_older_flat_configs_lack() -> None:
    """A flat config written before the grid pooling, the global score and the position Gaussian
    existed gets the values those models were trained and scored with, not today's defaults."""
    defaults = MoLEFlowConfig()
    assert (defaults.features.grid_downsample, defaults.scoring.global_score_weight, defaults.scoring.position_gaussian_weight) != (1, 0.0, 0.0)
    cfg = MoLEFlowConfig.from_saved({"lora_rank": 2, "image_size": 64})
    assert cfg.features.grid_downsample == 1
    assert cfg.scoring.global_score_weight == 0.0
    assert cfg.scoring.position_gaussian_weight == 0.0
    assert cfg.experts.lora_rank == 2 and cfg.features.image_size == 64
    # everything else is today's default
    assert cfg == defaults.updated({"lora_rank": 2, "image_size": 64, **LEGACY_ABSENT})


@pytest.mark.parametrize("absent", sorted(LEGACY_ABSENT))
def test_from_saved_fills_only_the_absent_fields(absent: str) -> None:
    flat = {name: value for group in MoLEFlowConfig().to_dict().values() for name, value in group.items()}
    flat["router"] = "prototype"  # a config without a memory cannot have the memory router
    del flat[absent]
    cfg = MoLEFlowConfig.from_saved(flat)
    assert getattr(getattr(cfg, FIELD_GROUPS[absent]), absent) == LEGACY_ABSENT[absent]
    for name in set(LEGACY_ABSENT) - {absent}:  # present fields keep their saved values
        assert getattr(getattr(cfg, FIELD_GROUPS[name]), name) == flat[name]


def test_from_saved_keeps_saved_values_of_grouped_configs() -> None:
    cfg = MoLEFlowConfig.from_dict({"experts": {"lora_rank": 4}, "scoring": {"global_score_weight": 0.25}})
    assert MoLEFlowConfig.from_saved(cfg.to_dict()) == cfg  # today's checkpoints load as saved
    assert MoLEFlowConfig.from_saved({"scoring": ScoringConfig(position_gaussian_weight=2.0)}).scoring.position_gaussian_weight == 2.0
    # a nested config that lacks one of the fields inside its group gets the legacy value for it
    partial = MoLEFlowConfig.from_saved({"features": {"image_size": 64}, "scoring": {"global_score_weight": 0.5}})
    assert partial.features.grid_downsample == 1
    assert partial.scoring.position_gaussian_weight == 0.0
    assert partial.scoring.global_score_weight == 0.5
    with pytest.raises(ValueError, match="lora_rnak"):
        MoLEFlowConfig.from_saved({"lora_rnak": 4})


# ----------------------------------------------------------------------------- copies
def test_updated_takes_group_dotted_and_plain_names_and_copies() -> None:
    base = MoLEFlowConfig()
    cfg = base.updated({"experts.lora_rank": 4, "n_coupling_blocks": 3, "features.layers": [1, 2]})
    assert cfg.experts.lora_rank == 4
    assert cfg.flow.n_coupling_blocks == 3
    assert cfg.features.layers == (1, 2)
    assert base == MoLEFlowConfig()  # the original is unchanged
    assert cfg.experts is not base.experts
    assert base.updated({}) == base and base.updated({}) is not base


@pytest.mark.parametrize("key", ["lora_rnak", "experts.lora_rnak", "flow.lora_rank", "optimiser.lr", "a.b.lr"])
def test_updated_names_unknown_keys(key: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"Unknown MoLEFlowConfig field {key!r}")):
        MoLEFlowConfig().updated({key: 1})
