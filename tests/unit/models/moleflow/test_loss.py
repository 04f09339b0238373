"""MoLE-Flow loss terms."""

import math

import pytest
import torch

from anomalib_moleflow.models.moleflow.loss import MoLEFlowLoss, patch_nll, top_k_mean


def test_patch_nll_formula() -> None:
    z = torch.ones(1, 2, 2, 4)
    log_jac = torch.full((1, 2, 2), 0.5)
    assert torch.allclose(patch_nll(z, log_jac), torch.full((1, 2, 2), 2.0 - 0.5))


def test_plain_nll_is_mean_per_dimension() -> None:
    z = torch.randn(2, 4, 4, 6)
    log_jac = torch.randn(2, 4, 4)
    loss, _ = MoLEFlowLoss(tail_weight=0.0, logdet_reg=0.0)(z, log_jac)
    assert torch.allclose(loss, (patch_nll(z, log_jac) / 6).mean())


def test_tail_term_weights_the_worst_patches() -> None:
    z = torch.zeros(1, 10, 10, 2)
    z[0, 0, 0] = 10.0  # one bad patch
    log_jac = torch.zeros(1, 10, 10)
    plain, _ = MoLEFlowLoss(tail_weight=0.0, logdet_reg=0.0)(z, log_jac)
    tail, parts = MoLEFlowLoss(tail_weight=0.7, tail_top_ratio=0.02, logdet_reg=0.0)(z, log_jac)
    nll_bad = 0.5 * 200 / 2
    k = math.ceil(0.02 * 100)
    assert torch.allclose(parts["tail"], torch.tensor(nll_bad / k))
    assert torch.allclose(tail, 0.3 * plain + 0.7 * parts["tail"])
    assert tail > plain


def test_regularisers_add_up() -> None:
    z = torch.randn(2, 3, 3, 4)
    log_jac = torch.full((2, 3, 3), 8.0)
    base, _ = MoLEFlowLoss(tail_weight=0.0, logdet_reg=0.0)(z, log_jac)
    reg, parts = MoLEFlowLoss(tail_weight=0.0, logdet_reg=1e-2, center_loss_weight=0.1)(z, log_jac)
    expected = base + 1e-2 * 4.0 + 0.1 * ((z**2).sum(-1) / 4).mean()
    assert torch.allclose(reg, expected)
    assert set(parts) == {"nll", "logdet_reg", "center"}


def test_focal_downweights_easy_patches() -> None:
    z = torch.zeros(1, 2, 2, 2)
    log_jac = torch.zeros(1, 2, 2)
    loss, _ = MoLEFlowLoss(tail_weight=0.0, logdet_reg=0.0, focal_gamma=2.0)(z + 0.1, log_jac)
    plain, _ = MoLEFlowLoss(tail_weight=0.0, logdet_reg=0.0)(z + 0.1, log_jac)
    assert loss < plain


@pytest.mark.parametrize("k", [1, 3, 100])
def test_top_k_mean(k: int) -> None:
    values = torch.arange(10.0).reshape(1, 10)
    expected = values[0, -min(k, 10):].mean()
    assert torch.allclose(top_k_mean(values, k), expected)


def test_top_k_mean_clamps_k_to_the_row() -> None:
    values = torch.tensor([[1.0, 3.0, 2.0], [0.0, -1.0, 5.0]])
    assert torch.equal(top_k_mean(values, 0), torch.tensor([3.0, 5.0]))  # at least one entry
    assert torch.allclose(top_k_mean(values, 2), torch.tensor([2.5, 2.5]))


def test_parts_are_detached_and_the_loss_has_gradients() -> None:
    z = torch.randn(2, 4, 4, 6, requires_grad=True)
    log_jac = torch.randn(2, 4, 4, requires_grad=True)
    loss, parts = MoLEFlowLoss()(z, log_jac)
    assert set(parts) == {"nll", "tail", "logdet_reg"}  # the defaults: tail term and log-det regulariser
    assert all(not p.requires_grad for p in parts.values())
    loss.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    # default tail weight 1: the loss is the tail term alone plus the regulariser
    assert torch.allclose(loss.detach(), parts["tail"] + parts["logdet_reg"])
    k = math.ceil(0.02 * 16)
    expected_tail = top_k_mean((patch_nll(z, log_jac) / 6).flatten(1), k).mean()
    assert torch.allclose(parts["tail"], expected_tail.detach())
