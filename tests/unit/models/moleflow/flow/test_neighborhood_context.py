"""The lower-case v4.1 fixed neighbourhood-mean context: the notes' formula, no trainable
parameter, and the shared flow with it as its subnets' context extractor (still invertible, its
log-det the full Jacobian's)."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian
from torch.nn import functional as F

from anomalib_moleflow.models.moleflow.config import MoLEFlowConfig
from anomalib_moleflow.models.moleflow.flow import NeighborhoodContextExtractor, SharedFlow


def test_context_is_the_notes_blend_with_a_depthwise_average_kernel() -> None:
    extractor = NeighborhoodContextExtractor(kernel_size=3, gate=0.3)
    x = torch.randn(2, 4, 5, 6)
    kernel = torch.ones(4, 1, 3, 3) / 9  # the notes' fixed kernel, one per channel (groups = channels)
    neighbor_mean = F.conv2d(x, kernel, padding=1, groups=4)
    torch.testing.assert_close(extractor(x), 0.7 * x + 0.3 * neighbor_mean)


def test_a_spike_spreads_a_fixed_share_to_its_neighbours() -> None:
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = 9.0
    y = NeighborhoodContextExtractor(kernel_size=3, gate=0.3)(x)[0, 0]
    assert y[2, 2].item() == pytest.approx(0.7 * 9 + 0.3 * 1)
    assert y[1, 1].item() == pytest.approx(0.3) and y[0, 0].item() == 0.0
    wide = NeighborhoodContextExtractor(kernel_size=5, gate=1.0)(x)[0, 0]
    assert wide[0, 0].item() == pytest.approx(9 / 25)  # the whole 5 x 5 window, zero padding


def test_it_has_nothing_to_train_and_no_state() -> None:
    extractor = NeighborhoodContextExtractor()
    assert list(extractor.parameters()) == [] and extractor.state_dict() == {}
    assert (extractor.kernel_size, extractor.gate) == (3, 0.3)  # the notes' values


@pytest.mark.parametrize(("kwargs", "match"), [({"kernel_size": 2}, "kernel_size must be odd"), ({"gate": -0.1}, r"gate must be in \[0, 1\]")])
def test_bad_arguments_are_named(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NeighborhoodContextExtractor(**kwargs)


def _flow(**overrides: object) -> SharedFlow:
    torch.manual_seed(0)
    config = MoLEFlowConfig.from_dict({
        "flow": {"n_coupling_blocks": 3, "use_neighborhood_context": True, "neighborhood_kernel": 3, **overrides},
        "experts": {"lora_rank": 2},
    })
    flow = SharedFlow(6, config).double()
    flow.add_adapter("0")
    flow.set_adapter("0")
    for p in flow.adapter_parameters("0"):
        torch.nn.init.normal_(p, std=0.1)
    return flow


def test_the_flows_context_branch_is_the_fixed_extractor() -> None:
    flow = _flow(neighborhood_gate=0.5)
    subnets = flow.subnets()
    assert all(isinstance(s.context_conv, NeighborhoodContextExtractor) and s.context_conv.gate == 0.5 for s in subnets)
    # what is left of the context to train: each subnet's bounded alpha, no extractor weight
    assert [p.numel() for p in flow.context_parameters()] == [1] * len(subnets)
    assert not any("context_conv" in name for name in flow.state_dict())
    learned = SharedFlow(6, MoLEFlowConfig.from_dict({"n_coupling_blocks": 3, "context_kernel": 3}))
    assert all(isinstance(s.context_conv, torch.nn.Conv2d) for s in learned.subnets())  # off by default


def test_flow_with_fixed_context_inverts_to_1e5() -> None:
    flow = _flow()
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    z, log_jac = flow(x)
    x_back, log_jac_rev = flow(z, rev=True)
    assert torch.allclose(x_back, x, atol=1e-5)
    assert torch.allclose(log_jac_rev, -log_jac, atol=1e-5)


@pytest.mark.parametrize("gate_net", [False, True], ids=["alpha", "patch-gate"])
def test_flow_with_fixed_context_logdet_matches_the_full_jacobian(gate_net: bool) -> None:
    flow = _flow(use_context_gate=gate_net)
    if gate_net:  # the Baseline 2.0 gate starts at zero weights: randomise it
        for subnet in flow.subnets():
            for p in subnet.context_gate_net.parameters():
                torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(1, 2, 3, 6, dtype=torch.float64)
    _, log_jac = flow(x)
    jac = jacobian(lambda v: flow(v.reshape(x.shape))[0].reshape(-1), x.reshape(-1))
    assert torch.allclose(torch.linalg.slogdet(jac).logabsdet, log_jac.sum(), atol=1e-6)
