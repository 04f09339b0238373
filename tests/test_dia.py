"""Deep invertible adapter: identity start, inversion, log-det vs numerical Jacobian."""

import torch
from torch.autograd.functional import jacobian

from anomalib_moleflow.models.moleflow.dia import AffineCouplingBlock, DeepInvertibleAdapter


def _randomised(channels: int = 6, n_blocks: int = 2) -> DeepInvertibleAdapter:
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
