"""The outbox's files: one ``<id>.msg`` per message, its attempts in ``<id>.state``.

A ``.msg`` is a line of JSON (the envelope: sender, recipients, when it was queued,
whether its failure alerts the operator), then the message as sent, byte for byte
(CRLF, as on the wire), so every try sends the same bytes and the same Message-ID.
A ``.state`` (JSON: attempts, next try, last error) exists only once a message has
been tried. No I/O policy here beyond reading and writing one entry.
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any, BinaryIO

from purlgate.channels.replies import PLACEHOLDER
from purlgate.core.files import AtomicFile

log = logging.getLogger("purlgate.outbox")
KEY_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")
# An entry's attempts state (over its envelope line); it moves with the entry to failed/.
STATE_KEYS = ("attempts", "next_at", "last_error", "created_at")
ENVELOPE_KEYS = ("sender", "recipients", "created_at", "alert")


@dataclass
class Item:
    id: str
    path: Path  # the .msg: its envelope line, then the message as sent
    meta: dict[str, Any]  # the envelope, with the attempts state over it


def entry_id(key: str) -> str:
    """A key as a file name: lower case, anything but ``KEY_CHARS`` made ``_``."""
    return "".join(c if c in KEY_CHARS else "_" for c in key.lower())


def write_message(out: BinaryIO, message: EmailMessage, attachment: Path | None) -> None:
    """The message as sent (CRLF), with ``attachment`` streamed in base64 in place of
    the placeholder part's body (76-character lines, as the email package writes)."""
    # With the message's own policy (ours: see replies.MAIL_POLICY), lines ended by CRLF.
    raw = message.as_bytes(policy=message.policy.clone(linesep="\r\n"))
    if attachment is None:
        out.write(raw)
        return
    marker = base64.b64encode(PLACEHOLDER)
    at = raw.rindex(marker)  # the last part: a copied Subject cannot come after it
    out.write(raw[:at])
    with attachment.open("rb") as f:
        while piece := f.read(57 * 1024):  # 57 bytes make one 76-character line
            out.write(base64.encodebytes(piece).replace(b"\n", b"\r\n"))
    out.write(raw[at + len(marker) + 2:])  # past the marker's own CRLF


def write_entry(path: Path, envelope: dict[str, Any], message: EmailMessage,
                attachment: Path | None, *, sync_dir: bool = True) -> None:
    """One entry, committed by the rename of its hidden ``.part`` (fsynced) into place."""
    with AtomicFile(path, no_clobber=False, sync_dir=sync_dir) as out:
        out.file.write(json.dumps(envelope).encode() + b"\n")
        write_message(out.file, message, attachment)
        out.commit()


def read_envelope(path: Path) -> tuple[dict[str, Any], int]:
    """An entry's envelope (its first line) and where its message starts."""
    with path.open("rb") as f:
        line = f.readline(1 << 16)
    if not line.endswith(b"\n"):
        raise ValueError("no envelope line")
    envelope = json.loads(line)
    if not isinstance(envelope, dict):
        raise ValueError("the envelope line is not an object")  # noqa: TRY004 - read as unreadable JSON
    return envelope, len(line)


def message_bytes(path: Path) -> bytes:
    """The message of an entry file, as sent (the file less its envelope line)."""
    with path.open("rb") as f:
        f.readline(1 << 16)
        return f.read()


def read_item(item_id: str, folder: Path) -> Item | None:
    """The entry ``item_id`` in ``folder`` with its state, or None (not there, or
    unreadable: left for an operator, logged)."""
    path = folder / f"{item_id}.msg"
    try:
        meta, _ = read_envelope(path)
    except FileNotFoundError:
        return None
    except ValueError:
        log.warning("outbox %s: its file is unreadable; left for an operator", item_id)
        return None
    try:
        meta.update(json.loads(path.with_suffix(".state").read_text()))
    except FileNotFoundError:
        pass  # never tried yet
    except ValueError:
        log.warning("outbox %s: its attempts state is unreadable; counted afresh", item_id)
    meta.setdefault("attempts", 0)
    meta.setdefault("next_at", meta["created_at"])
    meta.setdefault("last_error", None)
    return Item(item_id, path, meta)


def write_state(item: Item, folder: Path) -> None:
    state = {k: item.meta[k] for k in STATE_KEYS if k in item.meta}
    with AtomicFile(folder / f"{item.id}.state", no_clobber=False) as out:
        out.file.write(json.dumps(state).encode())
        out.commit()
