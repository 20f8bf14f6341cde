"""Embedded links: https, 128-bit tokens that only the region's key can make or read."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pyarrow as pa
import pytest

from purlgate.core.render import RenderRequest
from purlgate.errors import ConfigError
from purlgate.renderers.embedded import (
    EmbeddedRenderer,
    decode,
    load_or_create_key,
    parse_key,
    tokens,
)

KEY = bytes(range(32))


def test_tokens_are_128_bit_and_distinct() -> None:
    """Every row of every batch gets its own 32-hex-digit token."""
    a = tokens(KEY, 1, 0, 50_000).to_pylist()
    b = tokens(KEY, 2, 0, 50_000).to_pylist()
    assert all(len(t) == 32 and int(t, 16) >= 0 for t in a)
    assert len(set(a) | set(b)) == 100_000


def test_tokens_need_the_key() -> None:
    """The same batch and row under another key give unrelated tokens."""
    other = bytes(32)
    assert tokens(KEY, 5, 0, 1000).to_pylist() != tokens(other, 5, 0, 1000).to_pylist()
    assert decode(other, tokens(KEY, 5, 7, 1).to_pylist()[0]) is None


def test_token_decodes_to_its_batch_and_row() -> None:
    """The web side finds the row from the token alone; forged tokens are rejected."""
    token = tokens(KEY, 42, 123_456, 1).to_pylist()[0]
    assert decode(KEY, token) == (42, 123_456)
    assert decode(KEY, os.urandom(16).hex()) is None
    assert decode(KEY, "zz" * 16) is None
    assert decode(KEY, "ab") is None


def test_blocks_continue_the_sequence() -> None:
    """Rendering in blocks gives the same tokens as rendering at once."""
    whole = tokens(KEY, 9, 0, 300).to_pylist()
    parts = tokens(KEY, 9, 0, 100).to_pylist() + tokens(KEY, 9, 100, 200).to_pylist()
    assert whole == parts


def test_renderer_links() -> None:
    """thumbnail_1 is /t/<token>.jpg and landingPage /p/<token> under the https base."""
    r = EmbeddedRenderer(KEY, "https://purl.example")
    result = r.render(RenderRequest(batch_id=1, first_index=0,
                                    columns={"a": pa.array(["x", "y"])}, num_rows=2))
    thumbs, pages = result.thumbnails.to_pylist(), result.landing_pages.to_pylist()
    for t, p in zip(thumbs, pages, strict=True):
        token = p.removeprefix("https://purl.example/p/")
        assert t == f"https://purl.example/t/{token}.jpg"
        assert decode(KEY, token) is not None


def test_key_file_created_once_with_0600(tmp_path: Path) -> None:
    """The generated key is private and stable across restarts."""
    path = tmp_path / "usa" / "token.key"
    first = load_or_create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(path) == first
    assert len(first) == 32


def test_bad_key_file_is_a_config_error() -> None:
    """A key that is not 64 hex digits stops the region with a clear message."""
    with pytest.raises(ConfigError):
        parse_key(b"short")
