"""Base coupling flow: inversion, log-det against numerical Jacobians, LoRA identity start."""

import pytest
import torch
from torch.autograd.functional import jacobian

from anomalib_moleflow.models.moleflow.config import MoLEFlowConfig
from anomalib_moleflow.models.moleflow.flow import BaseFlow


def _flow(channels: int = 6, **overrides) -> BaseFlow:
    torch.manual_seed(0)
    cfg = MoLEFlowConfig(n_coupling_blocks=3, lora_rank=2, context_kernel=3, **overrides)
    flow = BaseFlow(channels, cfg).double()
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
        BaseFlow(5, MoLEFlowConfig())
