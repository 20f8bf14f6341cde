"""The previous release's outbox layout, converted: ``<id>.eml`` + ``<id>.json`` (the
.json was the commit point) become ``<id>.msg`` (+ ``<id>.state``).

Queued and failed entries are converted, so that one layout is sent and listed; sent
records stay as they are (``Outbox._known`` still refuses their keys and the retention
sweep still finds them). An ``.eml`` without its ``.json`` in the queue was never
committed and goes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from purlgate.channels.outbox_files import ENVELOPE_KEYS, Item, write_state
from purlgate.core.files import AtomicFile

log = logging.getLogger("purlgate.outbox")


def convert_folder(folder: Path, *, queue: bool, finished: tuple[Path, ...]) -> None:
    """Convert the old entries in ``folder``; in the queue (``queue``), one already in a
    ``finished`` folder (sent, failed) was finished before a crash and goes."""
    for meta_path in sorted(folder.glob("*.json")):
        eml = meta_path.with_suffix(".eml")
        if queue and any((f / meta_path.name).exists() for f in finished):
            meta_path.unlink(missing_ok=True)
            eml.unlink(missing_ok=True)
            continue
        try:
            meta = json.loads(meta_path.read_text())
            body = eml.read_bytes()
        except FileNotFoundError:
            continue  # gone meanwhile, or a record without its body: left as it is
        except ValueError:
            log.warning("outbox %s: its .json is unreadable; left for an operator",
                        meta_path.stem)
            continue
        item = Item(meta_path.stem, folder / f"{meta_path.stem}.msg", meta)
        if meta.get("attempts") or not queue:
            write_state(item, folder)
        envelope = {k: meta[k] for k in ENVELOPE_KEYS if k in meta}
        with AtomicFile(item.path, no_clobber=False) as out:
            out.file.write(json.dumps(envelope).encode() + b"\n" + body)
            out.commit()
        meta_path.unlink()
        eml.unlink(missing_ok=True)
        log.info("outbox %s: converted from the previous release's layout", item.id)
    for eml in folder.glob("*.eml") if queue else ():
        if not eml.with_suffix(".json").exists():
            eml.unlink(missing_ok=True)  # never committed (no .json)
