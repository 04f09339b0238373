"""Deep invertible adapter: identity start, inversion, log-det vs numerical Jacobian (FrEIA contract)."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian

from anomalib_moleflow.models.moleflow.experts.dia import (
    AffineCouplingBlock,
    DeepInvertibleAdapter,
    SimpleSubnet,
)


def _randomised(channels: int = 6, n_blocks: int = 2) -> DeepInvertibleAdapter:
    """A float64 adapter with every parameter random (no longer the identity)."""
    torch.manual_seed(0)
    dia = DeepInvertibleAdapter(channels, n_blocks=n_blocks, hidden_ratio=1.0).double()
    for p in dia.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return dia


def test_new_adapter_is_identity() -> None:
    dia = DeepInvertibleAdapter(8).double()
    z = torch.randn(2, 3, 3, 8, dtype=torch.float64)
    out, log_jac = dia(z)
    assert torch.equal(out, z)
    assert torch.equal(log_jac, torch.zeros(2, 3, 3, dtype=torch.float64))


def test_inverts_to_1e5() -> None:
    dia = _randomised()
    z = torch.randn(2, 4, 4, 6, dtype=torch.float64)
    y, ld = dia(z)
    back, ld_rev = dia(y, rev=True)
    assert torch.allclose(back, z, atol=1e-5)
    assert torch.allclose(ld_rev, -ld, atol=1e-5)
    assert not torch.allclose(y, z)


def test_logdet_matches_numerical_jacobian() -> None:
    dia = _randomised(channels=5, n_blocks=3)  # odd width exercises uneven splits
    v = torch.randn(5, dtype=torch.float64)
    _, ld = dia(v.reshape(1, 1, 1, 5))
    jac = jacobian(lambda u: dia(u.reshape(1, 1, 1, 5))[0].reshape(-1), v)
    assert torch.allclose(torch.linalg.slogdet(jac).logabsdet, ld.reshape(()), atol=1e-6)


def test_scale_is_clamped() -> None:
    block = AffineCouplingBlock([(4,)], hidden_dim=8, clamp=1.9).double()
    for p in block.parameters():
        torch.nn.init.constant_(p, 5.0)
    (_,), ld = block([torch.ones(3, 4, dtype=torch.float64)])
    assert torch.all(ld.abs() <= 1.9 * 2 + 1e-9)


@pytest.mark.parametrize("swap", [False, True])
def test_coupling_block_follows_the_freia_contract(swap: bool) -> None:
    """``forward([x], rev) -> ((y,), log_jac_det)``: inverts to 1e-5, +J forward, -J in reverse,
    and one half passes through unchanged."""
    torch.manual_seed(1)
    block = AffineCouplingBlock([(5,)], hidden_dim=8, clamp=1.9, swap=swap).double()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(4, 5, dtype=torch.float64)
    (y,), ld = block([x])
    (back,), ld_rev = block([y], rev=True)
    assert torch.allclose(back, x, atol=1e-5)
    assert torch.allclose(ld_rev, -ld, atol=1e-5)
    assert ld.shape == (4,)
    passive = slice(0, block.len1) if not swap else slice(5 - block.len1, 5)
    assert torch.equal(y[:, passive], x[:, passive])
    assert block.output_dims([(5,)]) == [(5,)]
    for i in range(2):
        jac = jacobian(lambda v, i=i: block([v[None]])[0][0][0], x[i])
        assert torch.allclose(torch.linalg.slogdet(jac).logabsdet, ld[i], atol=1e-6)


def test_subnet_output_layers_start_at_zero_and_hidden_width_follows_the_ratio() -> None:
    dia = DeepInvertibleAdapter(10, n_blocks=3, hidden_ratio=2.0)
    subnets = [m for m in dia.modules() if isinstance(m, SimpleSubnet)]
    assert len(subnets) == 6  # s and t of each block
    for subnet in subnets:
        assert subnet[0].out_features == 20
        assert torch.count_nonzero(subnet[-1].weight) == 0 and torch.count_nonzero(subnet[-1].bias) == 0
    assert DeepInvertibleAdapter(10, hidden_ratio=0.1).inn.module_list[0].s_net[0].out_features == 8  # at least 8
    swaps = [block.swap for block in dia.inn.module_list]
    assert swaps == [False, True, False]  # alternating halves
