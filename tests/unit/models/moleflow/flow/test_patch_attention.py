"""v6 patch self-attention: its start (the notes' sigmoid gate at 0.5, FFN adding nothing), that it
mixes patches, and in the model: shared, trained on task 0, then frozen."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import same_bits, tiny_config, train_task_steps

from anomalib_moleflow.models.moleflow import MoLEFlowModel
from anomalib_moleflow.models.moleflow.flow import LightweightPatchAttention


def _attention(embed_dim: int = 6, hidden_dim: int = 4) -> LightweightPatchAttention:
    torch.manual_seed(0)
    return LightweightPatchAttention(embed_dim, hidden_dim, dropout=0.0).eval()


def test_it_starts_with_half_the_attention_and_no_ffn() -> None:
    module = _attention()
    x = torch.randn(2, 3, 4, 6)
    seq = x.reshape(2, 12, 6)
    normed = torch.nn.functional.layer_norm(seq, (6,), module.attention_norm.weight, module.attention_norm.bias)
    q, k, v = module.q_proj(normed), module.k_proj(normed), module.v_proj(normed)
    attended = module.out_proj(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(4), dim=-1) @ v)
    # the notes' gate: zeros(1) read through a sigmoid, so 0.5 from the start; the FFN output is zero
    torch.testing.assert_close(module(x), (seq + 0.5 * attended).reshape(x.shape))
    with torch.no_grad():
        module.gate.fill_(-1e4)  # a closed gate (with the zero FFN) is the identity
    torch.testing.assert_close(module(x), x)


def test_each_patch_sees_every_other_patch() -> None:
    module = _attention()
    x = torch.randn(1, 3, 3, 6)
    moved = x.clone()
    moved[0, 2, 2] = 3 * torch.randn(6)  # a new patch (not a shift, which the LayerNorm removes)
    y, y_moved = module(x), module(moved)
    assert (y[0, 0, 0] - y_moved[0, 0, 0]).abs().max() > 1e-3  # the far corner changed too


def test_it_is_equivariant_to_the_order_of_the_patches() -> None:
    module = _attention()
    with torch.no_grad():
        torch.nn.init.normal_(module.ffn[-1].weight, std=0.3)
    x = torch.randn(2, 1, 8, 6)
    order = torch.randperm(8)
    torch.testing.assert_close(module(x[:, :, order]), module(x)[:, :, order])


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"embed_dim": 0}, "embed_dim and hidden_dim"), ({"embed_dim": 4, "dropout": 1.0}, r"dropout must be in \[0, 1\)")]
)
def test_bad_arguments_are_named(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LightweightPatchAttention(**kwargs)


def test_in_the_model_it_trains_on_task0_then_stays_bit_identical(tiny_features: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = MoLEFlowModel(tiny_config(**{"flow.use_patch_attention": True, "flow.patch_attention_hidden": 16}))
    model.add_task()
    attention = model.patch_attention
    assert isinstance(attention, LightweightPatchAttention)
    shared = {id(p) for p in model.shared_parameters()["mixer"]}
    assert {id(p) for p in attention.parameters()} <= shared  # shared, not an expert's
    start = {n: p.detach().clone() for n, p in attention.named_parameters()}
    train_task_steps(model, "0", tiny_features)
    after0 = {n: p.detach().clone() for n, p in attention.named_parameters()}
    assert any(not torch.equal(start[n], after0[n]) for n in start)  # task 0 trains it
    model.add_task()
    train_task_steps(model, "1", tiny_features, steps=4)
    assert all(same_bits(p, after0[n]) for n, p in attention.named_parameters()), "trained after task 0"


def test_with_the_mixers_unfrozen_it_keeps_training(tiny_features: torch.Tensor) -> None:
    """The other side of the test above: the freeze is what keeps it fixed."""
    torch.manual_seed(0)
    config = tiny_config(**{"flow.use_patch_attention": True, "flow.patch_attention_hidden": 16, "flow.freeze_mixer_after_task0": False})
    model = MoLEFlowModel(config)
    model.add_task()
    model.add_task()
    before = [p.detach().clone() for p in model.patch_attention.parameters()]
    train_task_steps(model, "1", tiny_features)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.patch_attention.parameters(), strict=True))
