"""Fixtures of the backbone tests: a fresh weights cache per test module (never the user's), and a
guard that makes any hub or URL download fail loudly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="module", autouse=True)
def _weights_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Convert into a fresh temp cache, never the user's."""
    path = tmp_path_factory.mktemp("moleflow_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ANOMALIB_MOLEFLOW_CACHE", str(path))
        yield path


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any timm hub / URL weight download fail loudly."""

    def _fail(*args: object, **kwargs: object) -> None:
        msg = f"unexpected download: {args}"
        raise AssertionError(msg)

    import timm.models._builder as builder

    for fn in ("load_state_dict_from_hf", "load_state_dict_from_url", "download_cached_file", "load_custom_from_hf"):
        monkeypatch.setattr(builder, fn, _fail)
