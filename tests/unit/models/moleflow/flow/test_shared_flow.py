"""Shared coupling flow: inversion, log-det against numerical Jacobians (FrEIA contract), LoRA
identity start, and which parameters are shared."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian

from anomalib_moleflow.models.moleflow.config import MoLEFlowConfig
from anomalib_moleflow.models.moleflow.flow import MoLEContextSubnet, SharedFlow


def _config(**overrides: object) -> MoLEFlowConfig:
    """Three coupling blocks, rank-2 LoRA, 3 x 3 context kernel, plus ``overrides`` (plain names)."""
    return MoLEFlowConfig.from_dict({"n_coupling_blocks": 3, "lora_rank": 2, "context_kernel": 3, **overrides})


def _flow(channels: int = 6, **overrides: object) -> SharedFlow:
    """A float64 flow with expert "0" active and randomised (so it takes part in every check)."""
    torch.manual_seed(0)
    flow = SharedFlow(channels, _config(**overrides)).double()
    flow.add_adapter("0")
    flow.set_adapter("0")
    # give the expert non-zero weights so it actually takes part in the check
    for p in flow.adapter_parameters("0"):
        torch.nn.init.normal_(p, std=0.1)
    return flow


@pytest.mark.parametrize("use_context", [True, False])
def test_inverts_to_1e5(use_context: bool) -> None:
    flow = _flow(use_context=use_context)
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    z, log_jac = flow(x)
    x_back, log_jac_rev = flow(z, rev=True)
    assert torch.allclose(x_back, x, atol=1e-5)
    assert torch.allclose(log_jac_rev, -log_jac, atol=1e-5)
    assert log_jac.shape == (2, 3, 4)


def test_per_patch_logdet_matches_numerical_jacobian_without_context() -> None:
    flow = _flow(use_context=False)
    x = torch.randn(1, 1, 3, 6, dtype=torch.float64)
    _, log_jac = flow(x)
    for i in range(3):
        def one_patch(v: torch.Tensor, i: int = i) -> torch.Tensor:
            xi = x.clone()
            xi[0, 0, i] = v
            return flow(xi)[0][0, 0, i]

        jac = jacobian(one_patch, x[0, 0, i])
        assert torch.allclose(torch.linalg.slogdet(jac).logabsdet, log_jac[0, 0, i], atol=1e-6)


def test_total_logdet_matches_full_jacobian_with_spatial_context() -> None:
    """With the context branch, patches interact; the summed per-patch log-dets must still
    equal log|det| of the Jacobian over all patches (the coupling stays triangular)."""
    flow = _flow(use_context=True)
    x = torch.randn(1, 2, 2, 6, dtype=torch.float64)
    _, log_jac = flow(x)
    jac = jacobian(lambda v: flow(v.reshape(x.shape))[0].reshape(-1), x.reshape(-1))
    assert torch.allclose(torch.linalg.slogdet(jac).logabsdet, log_jac.sum(), atol=1e-6)


def test_fresh_lora_expert_leaves_output_unchanged() -> None:
    flow = _flow()
    x = torch.randn(2, 3, 3, 6, dtype=torch.float64)
    flow.set_adapter(None)
    z_base, ld_base = flow(x)
    flow.add_adapter("1")
    flow.set_adapter("1")
    z_new, ld_new = flow(x)
    assert torch.equal(z_new, z_base)
    assert torch.equal(ld_new, ld_base)
    flow.set_adapter("0")  # the trained-looking expert really changes the output
    assert not torch.allclose(flow(x)[0], z_base)


def test_context_gate_variant_inverts() -> None:
    flow = _flow(use_context_gate=True)
    x = torch.randn(1, 3, 3, 6, dtype=torch.float64)
    z, _ = flow(x)
    assert torch.allclose(flow(z, rev=True)[0], x, atol=1e-5)


def test_odd_width_is_rejected() -> None:
    with pytest.raises(ValueError, match="even"):
        SharedFlow(5, MoLEFlowConfig())


def test_context_gate_variant_logdet_matches_full_jacobian() -> None:
    flow = _flow(use_context_gate=True)
    for subnet in flow.subnets():  # the gate starts at zero weights: randomise it
        for p in subnet.context_gate_net.parameters():
            torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(1, 2, 2, 6, dtype=torch.float64)
    _, log_jac = flow(x)
    jac = jacobian(lambda v: flow(v.reshape(x.shape))[0].reshape(-1), x.reshape(-1))
    assert torch.allclose(torch.linalg.slogdet(jac).logabsdet, log_jac.sum(), atol=1e-6)


def test_subnets_read_the_grid_of_each_input() -> None:
    flow = _flow()
    subnets = flow.subnets()
    assert len(subnets) == 3 and all(isinstance(s, MoLEContextSubnet) for s in subnets)
    flow(torch.randn(1, 2, 5, 6, dtype=torch.float64))
    assert all(s.grid_size == (2, 5) for s in subnets)
    flow(torch.randn(3, 4, 1, 6, dtype=torch.float64))
    assert all(s.grid_size == (4, 1) for s in subnets)


def test_parameter_groups_partition_the_flow() -> None:
    flow = _flow()
    flow.add_adapter("1")
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    base, context = ids(flow.base_parameters()), ids(flow.context_parameters())
    expert0, expert1 = ids(flow.adapter_parameters("0")), ids(flow.adapter_parameters("1"))
    groups = [base, context, expert0, expert1]
    assert all(groups)
    assert sum(len(g) for g in groups) == len(set().union(*groups))  # disjoint
    rest = {name for name, p in flow.named_parameters() if id(p) not in set().union(*groups)}
    assert rest and all("w_perm" in name for name in rest)  # only the fixed permutations
    assert len(flow.lora_layers()) == 4 * 3
    assert len(expert0) == 3 * len(flow.lora_layers())  # A, B and a bias in every linear


def test_set_adapter_reaches_every_linear() -> None:
    flow = _flow()
    flow.add_adapter("1")
    flow.set_adapter("1")
    assert {layer.active_adapter for layer in flow.lora_layers()} == {"1"}
    flow.set_adapter(None)
    assert {layer.active_adapter for layer in flow.lora_layers()} == {None}


def test_an_expert_without_lora_has_only_task_biases() -> None:
    flow = _flow()
    flow.add_adapter("1", lora=False)
    params = flow.adapter_parameters("1")
    assert len(params) == len(flow.lora_layers())
    assert all("1" not in layer.lora_A and "1" in layer.task_bias for layer in flow.lora_layers())
