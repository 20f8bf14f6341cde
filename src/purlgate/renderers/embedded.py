"""The embedded renderer: links under the region's own https base URL.

Token = AES-256 of the 16-byte block (batch id, row ordinal) under the region's secret
key, written as 32 hex digits. It is 128 bits, unguessable and not derivable from the
row data or the row number without the key; and it is reversible, so the web side
finds the row from the token alone without a table of tokens. The high bits of both
fields are zero for any real batch, which lets ``decode`` reject forged tokens.

All tokens of a block come from one cipher call over a buffer of counter blocks, so a
million rows cost a few hundred milliseconds, not a Python loop.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import numpy as np
import pyarrow as pa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from purlgate.core.files import publish_once
from purlgate.core.render import RenderRequest, RenderResult
from purlgate.errors import ConfigError

KEY_BYTES = 32
TOKEN_HEX = 32
FIELD_LIMIT = 1 << 40  # batch ids and row ordinals stay below this; the rest is redundancy


def load_or_create_key(path: Path, *, what: str = "token key") -> bytes:
    """Read a region key (the token key, the rows key), creating it (mode 0600) on
    first start."""
    try:
        return parse_key(path.read_bytes(), what=what)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    # Instances starting together on a shared data_dir: one key is published, all use it.
    fresh = (secrets.token_bytes(KEY_BYTES).hex() + "\n").encode()
    return parse_key(publish_once(path, fresh), what=what)


def parse_key(raw: bytes, *, what: str = "token key") -> bytes:
    try:
        key = bytes.fromhex(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"the {what} must be 64 hex digits") from exc
    if len(key) != KEY_BYTES:
        raise ConfigError(f"the {what} must be 64 hex digits (32 bytes)")
    return key


def _token_digits(key: bytes, batch_id: int, first_index: int, count: int) -> np.ndarray:
    """(count, 32) array of the hex digits of each row's token."""
    if not 0 <= batch_id < FIELD_LIMIT or first_index + count > FIELD_LIMIT:
        raise ValueError("batch id or row ordinal out of range")
    blocks = np.empty((count, 2), dtype=">u8")
    blocks[:, 0] = batch_id
    blocks[:, 1] = np.arange(first_index, first_index + count, dtype=np.uint64)
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # noqa: S305
    digits = (encryptor.update(blocks.tobytes()) + encryptor.finalize()).hex().encode("ascii")
    return np.frombuffer(digits, dtype=np.uint8).reshape(count, TOKEN_HEX)


def _fixed_width(parts: list[bytes | np.ndarray], count: int) -> pa.Array:
    """A string array whose every value is the concatenation of ``parts``.

    Constant parts are bytes; per-row parts are (count, width) uint8 arrays. Every
    value has the same length, so the offsets are a plain arithmetic sequence.
    """
    width = sum(len(p) if isinstance(p, bytes) else p.shape[1] for p in parts)
    out = np.empty((count, width), dtype=np.uint8)
    at = 0
    for part in parts:
        if isinstance(part, bytes):
            out[:, at : at + len(part)] = np.frombuffer(part, dtype=np.uint8)
            at += len(part)
        else:
            out[:, at : at + part.shape[1]] = part
            at += part.shape[1]
    offsets = np.arange(0, width * count + 1, width, dtype=np.int32)
    return pa.Array.from_buffers(
        pa.string(), count, [None, pa.py_buffer(offsets), pa.py_buffer(out)]
    )


def tokens(key: bytes, batch_id: int, first_index: int, count: int) -> pa.Array:
    """Hex tokens for rows ``first_index .. first_index + count - 1`` of a batch."""
    return _fixed_width([_token_digits(key, batch_id, first_index, count)], count)


def decode(key: bytes, token: str) -> tuple[int, int] | None:
    """(batch id, row ordinal) for a token we made, else None."""
    try:
        block = bytes.fromhex(token)
    except ValueError:
        return None
    if len(block) != 16:
        return None
    decryptor = Cipher(algorithms.AES(key), modes.ECB()).decryptor()  # noqa: S305
    plain = decryptor.update(block) + decryptor.finalize()
    batch_id, index = int.from_bytes(plain[:8], "big"), int.from_bytes(plain[8:], "big")
    if batch_id >= FIELD_LIMIT or index >= FIELD_LIMIT:
        return None
    return batch_id, index


class EmbeddedRenderer:
    """Links served by the gateway itself: ``/t/<token>.jpg`` and ``/p/<token>``."""

    keeps_rows = True
    paid = False

    def __init__(self, key: bytes, public_base_url: str) -> None:
        self._key = key
        self._thumb = f"{public_base_url}/t/".encode()
        self._page = f"{public_base_url}/p/".encode()

    def render(self, request: RenderRequest) -> RenderResult:
        n = request.num_rows
        digits = _token_digits(self._key, request.batch_id, request.first_index, n)
        return RenderResult(
            thumbnails=_fixed_width([self._thumb, digits, b".jpg"], n),
            landing_pages=_fixed_width([self._page, digits], n),
        )
