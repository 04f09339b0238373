"""The content checksum of checkpoints."""

from __future__ import annotations

import torch

from anomalib_moleflow.io import DIGEST_KEY, content_digest


def _checkpoint() -> dict:
    return {"state_dict": {"a": torch.arange(6.0).view(2, 3), "b": torch.tensor([True, False])}, "results": {"x": [1, None, "y"]}}


def test_the_same_content_gives_the_same_digest_and_the_key_is_left_out() -> None:
    a, b = _checkpoint(), _checkpoint()
    assert content_digest(a) == content_digest(b)
    b[DIGEST_KEY] = "anything"
    assert content_digest(a) == content_digest(b)
    assert len(content_digest(a)) == 64


def test_one_changed_byte_dtype_shape_or_value_changes_it() -> None:
    base = content_digest(_checkpoint())
    flipped = _checkpoint()
    flipped["state_dict"]["a"].view(-1).view(torch.uint8)[5] ^= 1  # one byte of a float
    reshaped = _checkpoint()
    reshaped["state_dict"]["a"] = reshaped["state_dict"]["a"].view(3, 2)
    retyped = _checkpoint()
    retyped["state_dict"]["a"] = retyped["state_dict"]["a"].double()
    edited = _checkpoint()
    edited["results"]["x"][2] = "z"
    digests = {content_digest(c) for c in (flipped, reshaped, retyped, edited)}
    assert base not in digests and len(digests) == 4
