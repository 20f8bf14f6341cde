"""The SFTP spool: a completed upload is on disk (fsynced) before its close or rename
is answered OK.

``incoming/<id>/`` holds one uploaded file and ``meta.json``; the rename of the folder
from ``tmp/`` is the commit point. An upload that cannot be handled moves to
``dead/<id>/`` with ``reason.json``; ``requeue`` puts it back.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from purlgate.core.files import GroupSync, fsync_dir, write_json
from purlgate.errors import StorageError

log = logging.getLogger("purlgate.sftp")


@dataclass(frozen=True)
class Upload:
    """A completed upload waiting in the SFTP spool."""

    id: str
    path: Path
    meta: dict[str, Any]


class SftpSpool:
    """See the module docstring. ``owner``: this process may clear ``tmp/`` (a command
    beside a running gateway must not)."""

    def __init__(self, root: Path, *, owner: bool = True, tmp: Path | None = None) -> None:
        self.incoming, self.dead = root / "incoming", root / "dead"
        self.tmp = tmp or root / "tmp"  # this instance's own when others share the spool
        for folder in (self.incoming, self.tmp, self.dead):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        for leftover in self.tmp.iterdir() if owner else ():
            shutil.rmtree(leftover, ignore_errors=True)
        self._sync = GroupSync(self.incoming)

    def adopt(self, source: Path, name: str, meta: dict[str, Any]) -> Upload:
        entry_id = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"
        staging = self.tmp / entry_id
        staging.mkdir(mode=0o700)
        target = staging / name
        meta = {**meta, "id": entry_id, "name": name}
        try:
            source.rename(target)  # same filesystem: the data is not copied
            with target.open("rb") as f:
                os.fsync(f.fileno())
            (staging / "meta.json").write_text(json.dumps(meta))
            fsync_dir(staging)
            staging.rename(self.incoming / entry_id)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)  # the caller tells the client
            raise
        self._sync.sync()
        return Upload(entry_id, self.incoming / entry_id / name, meta)

    def pending(self) -> list[Upload]:
        """Completed uploads not processed yet. An entry whose ``meta.json`` is not JSON
        or lacks its name is damaged (dead-lettered by the worker, never retried); a
        disk that fails to read it (EIO, say) is a StorageError: the worker pauses and
        reads it again, as with the mail spool."""
        found = []
        for folder in sorted(self.incoming.iterdir()):
            try:
                meta = json.loads((folder / "meta.json").read_text())
                path = folder / meta["name"]
            except FileNotFoundError:
                continue  # finished meanwhile
            except (ValueError, KeyError, TypeError):
                meta, path = {"damaged": True}, folder
            except OSError as exc:
                raise StorageError(f"SFTP spool entry {folder.name}: {exc.strerror}") from exc
            found.append(Upload(folder.name, path, meta))
        return found

    def finish(self, upload: Upload) -> None:
        shutil.rmtree(self.incoming / upload.id, ignore_errors=True)

    def dead_letter(self, upload: Upload, reason: dict[str, Any]) -> None:
        folder = self.incoming / upload.id
        write_json(folder / "reason.json", reason)
        folder.replace(self.dead / upload.id)  # the commit point
        fsync_dir(self.dead)

    def dead_entries(self) -> list[tuple[str, dict[str, Any]]]:
        found = []
        for folder in sorted(self.dead.iterdir()):
            try:
                reason = json.loads((folder / "reason.json").read_text())
            except (OSError, ValueError):
                reason = {"error": "reason unreadable"}
            found.append((folder.name, reason))
        return found

    def requeue(self, entry_id: str) -> None:
        """Put a dead upload back in ``incoming/``; KeyError if there is none."""
        folder = self.dead / entry_id
        if not folder.is_dir() or "/" in entry_id or entry_id.startswith("."):
            raise KeyError(entry_id)
        (folder / "reason.json").unlink(missing_ok=True)
        folder.replace(self.incoming / entry_id)
        fsync_dir(self.incoming)
