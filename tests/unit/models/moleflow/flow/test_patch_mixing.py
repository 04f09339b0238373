"""Patch mixers before the flow: spatial mixer, multi-scale context, and the task-conditioned
multi-scale context (its per-task conditions kept apart in the model)."""

from __future__ import annotations

import pytest
import torch
from helpers import same_bits, tiny_config, train_task_steps

from anomalib_moleflow.models.moleflow import MoLEFlowModel
from anomalib_moleflow.models.moleflow.flow.patch_mixing import (
    LightweightMSContext,
    SpatialMixer,
    TaskConditionedMSContext,
)


def test_spatial_mixer_averages_with_uniform_kernel_and_keeps_constants() -> None:
    mixer = SpatialMixer(3, kernel_size=3)
    const = torch.full((1, 4, 4, 3), 2.5)
    assert torch.allclose(mixer(const), const)  # a convex kernel keeps constant fields
    x = torch.zeros(1, 5, 5, 3)
    x[0, 2, 2] = 9.0
    y = mixer(x)
    # gate 0.5: half the spike stays, half is spread uniformly over the 3x3 neighbourhood
    assert torch.allclose(y[0, 2, 2], torch.full((3,), 4.5 + 0.5))
    assert torch.allclose(y[0, 1, 1], torch.full((3,), 0.5))


def test_ms_context_shape_and_gate() -> None:
    ctx = LightweightMSContext(4, dilations=(1, 2))
    x = torch.randn(2, 6, 6, 4)
    y = ctx(x)
    assert y.shape == x.shape
    # the gate starts at sigmoid(0) = 0.5: x plus half the fused dilated context
    spatial = x.permute(0, 3, 1, 2)
    fused = ctx.fusion(torch.cat([conv(spatial) for conv in ctx.dilated_convs], dim=1)).permute(0, 2, 3, 1)
    assert torch.allclose(y, x + 0.5 * fused, atol=1e-6)
    assert [conv.dilation for conv in ctx.dilated_convs] == [(1, 1), (2, 2)]
    with torch.no_grad():
        ctx.gate.fill_(-1e4)  # a closed gate is the identity
    assert torch.allclose(ctx(x), x)


def test_spatial_mixer_kernel_stays_convex_whatever_its_logits() -> None:
    """A softmax kernel cannot shrink features to a point (which would let the NLL collapse)."""
    mixer = SpatialMixer(2, kernel_size=3)
    with torch.no_grad():
        mixer.kernel_logits.normal_(std=5.0)
        mixer.gate.fill_(3.0)
    const = torch.full((2, 5, 4, 2), -1.5)
    assert torch.allclose(mixer(const), const, atol=1e-6)  # also at the borders (replicate padding)
    x = torch.rand(1, 6, 6, 2)
    y = mixer(x)
    assert y.min() >= x.min() - 1e-6 and y.max() <= x.max() + 1e-6


def test_spatial_mixer_gradients_reach_kernel_and_gate() -> None:
    mixer = SpatialMixer(3, kernel_size=3)
    mixer(torch.rand(1, 4, 4, 3)).square().sum().backward()
    assert mixer.kernel_logits.grad is not None and mixer.gate.grad is not None
    assert mixer.gate.grad.abs().item() > 0


# ----------------------------------------------------------------------------- task-conditioned
def test_a_new_tasks_condition_gives_the_plain_multi_scale_context() -> None:
    torch.manual_seed(0)
    conditioned = TaskConditionedMSContext(4, dilations=(1, 2))
    conditioned.add_task("0")
    plain = LightweightMSContext(4, dilations=(1, 2))
    plain.dilated_convs.load_state_dict(conditioned.dilated_convs.state_dict())
    plain.fusion.load_state_dict(conditioned.fusion.state_dict())
    x = torch.randn(2, 5, 5, 4)
    torch.testing.assert_close(conditioned(x, "0"), plain(x))


def test_each_tasks_condition_weights_scales_shifts_and_gates_its_context() -> None:
    torch.manual_seed(0)
    ctx = TaskConditionedMSContext(3, dilations=(1, 2))
    ctx.add_task("0")
    ctx.add_task("1")
    c = ctx.conditions["1"]
    with torch.no_grad():
        c.branch_weights.copy_(torch.tensor([0.0, 2.0]))
        c.gamma.fill_(3.0)
        c.beta.fill_(-1.0)
        c.gate.fill_(1.0)
    x = torch.randn(2, 4, 4, 3)
    spatial = x.permute(0, 3, 1, 2)
    fused = ctx.fusion(torch.cat([0 * ctx.dilated_convs[0](spatial), 2 * ctx.dilated_convs[1](spatial)], dim=1))
    expected = x + torch.sigmoid(torch.tensor(1.0)) * (3 * fused.permute(0, 2, 3, 1) - 1)
    torch.testing.assert_close(ctx(x, "1"), expected)
    assert not torch.allclose(ctx(x, "0"), ctx(x, "1"))
    # explicit per-image conditions (the stacked path): image 0 under task 1, image 1 under task 0
    stacked = [torch.stack([getattr(ctx.conditions[k], n) for k in ("1", "0")]) for n in ("branch_weights", "gamma", "beta", "gate")]
    mixed = ctx.conditioned(x, *stacked)
    torch.testing.assert_close(mixed[0], ctx(x, "1")[0])
    torch.testing.assert_close(mixed[1], ctx(x, "0")[1])


def test_shared_and_task_parameters_are_apart_and_keys_are_checked() -> None:
    ctx = TaskConditionedMSContext(3, dilations=(1, 2, 4))
    ctx.add_task("0")
    ctx.add_task("1")
    shared = {id(p) for p in ctx.shared_parameters()}
    task0, task1 = ({id(p) for p in ctx.task_parameters(k)} for k in ("0", "1"))
    assert len(task0) == 4 and not (shared & task0) and not (task0 & task1)
    assert shared | task0 | task1 == {id(p) for p in ctx.parameters()}
    assert ctx.task_parameters("7") == []
    with pytest.raises(KeyError, match="already has a condition for task '0'"):
        ctx.add_task("0")
    with pytest.raises(KeyError, match="no condition for task '5'"):
        ctx(torch.randn(1, 2, 2, 3), "5")
    with pytest.raises(ValueError, match="at least one dilation"):
        TaskConditionedMSContext(3, dilations=())


def test_in_the_model_each_task_trains_its_condition_alone(tiny_features: torch.Tensor) -> None:
    """Complete separation: task 1's training leaves task 0's condition, the shared convs and
    task 0's output bit-identical, and the state dict recreates every task's condition."""
    torch.manual_seed(0)
    config = tiny_config(**{"experts.input_adapter": "film", "flow.use_ms_context": True, "flow.ms_context_kind": "task_conditioned"})
    model = MoLEFlowModel(config)
    model.add_task()
    ctx = model.ms_context
    assert isinstance(ctx, TaskConditionedMSContext)
    assert {id(p) for p in ctx.task_parameters("0")} <= {id(p) for p in model.expert_parameters("0")}
    assert {id(p) for p in ctx.shared_parameters()} <= {id(p) for p in model.shared_parameters()["mixer"]}
    train_task_steps(model, "0", tiny_features)
    model.add_task()
    kept = {n: t.clone() for n, t in ctx.state_dict().items() if not n.startswith("conditions.1.")}
    assert any(n.startswith("conditions.0.") for n in kept) and any(n.startswith("fusion.") for n in kept)
    with torch.no_grad():
        before = model.flow_forward(tiny_features, "0")
    condition1 = [p.detach().clone() for p in ctx.task_parameters("1")]
    train_task_steps(model, "1", tiny_features, steps=4)
    state = ctx.state_dict()
    assert [n for n, t in kept.items() if not same_bits(state[n], t)] == []  # task 0's condition and the shared convs
    assert any(not torch.equal(b, p) for b, p in zip(condition1, ctx.task_parameters("1"), strict=True))
    with torch.no_grad():
        after = model.flow_forward(tiny_features, "0")
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    fresh = MoLEFlowModel(config)
    fresh.load_state_dict(model.state_dict())
    assert list(fresh.ms_context.conditions) == ["0", "1"]
    with torch.no_grad():
        assert torch.equal(fresh.flow_forward(tiny_features, "1")[0], model.flow_forward(tiny_features, "1")[0])
