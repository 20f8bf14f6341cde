"""The SFTP channel: per-client accounts, Uploads in, Downloads out (asyncssh).

Each client sees only its own tree, ``/<project>/Uploads`` and ``/<project>/Downloads``
(or ``/Uploads`` and ``/Downloads`` for a flat one-project account). No path leads out:
``..`` is refused, every component is checked with lstat so a planted symlink is
refused too, and symlinks cannot be made. ``Uploads``: create, write, rename, list.
``Downloads``: list, read, delete. Nothing else.

An upload counts when the client closes a file it wrote under a final name, or renames
a temporary name (``.filepart``, ``.part``, ``.tmp``, a leading dot: WinSCP, FileZilla)
to a final one. Before that close or rename is answered OK, the file is moved into the
durable SFTP spool (fsynced, renamed, folder fsynced). A transfer cut off mid-way (the
connection drops with the file open) is deleted, never processed. A name already
received for the client and project, or being received in another session, is refused
at open with the time it arrived.
"""

from __future__ import annotations

import asyncio
import csv
import errno
import io
import json
import logging
import os
import secrets
import shutil
import stat
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
from asyncssh import SFTPError

from purlgate.channels.alerts import OperatorAlerts
from purlgate.channels.defender import Defender, Event
from purlgate.channels.queue_worker import QueueWorker
from purlgate.channels.spool import GroupSync, write_json
from purlgate.config import ClientConfig, ProcessingConfig, ProjectConfig, SftpConfig
from purlgate.core.files import AtomicFile, fsync_dir
from purlgate.core.lifecycle import BatchState
from purlgate.core.naming import (
    ARCHIVE_EXTENSIONS,
    DATA_EXTENSIONS,
    PGP_EXTENSIONS,
    parse_data_name,
    select_project,
    split_extension,
    strip_pgp,
)
from purlgate.core.pipeline import BatchProcessor, Submission
from purlgate.errors import STORAGE_ERRNOS, ClientInputError, DamagedEntryError
from purlgate.passwords import hash_password, verify_password
from purlgate.store import SqliteBatchStore

log = logging.getLogger("purlgate.sftp")
STORAGE_REFUSAL = ("the server is out of disk space: nothing of this upload was kept; "
                   "please upload the file again later under the same name")
# Temporary names that clients upload to and then rename: WinSCP ".filepart", rclone
# ".<8 hex>.partial", FileZilla/others ".part" and ".tmp"; lftp's ".in.<name>." and any
# other hidden name start with a dot.
TEMP_SUFFIXES = (".filepart", ".partial", ".part", ".tmp")
ALLOWED = (*DATA_EXTENSIONS, *ARCHIVE_EXTENSIONS, *PGP_EXTENSIONS)
WRITE_FLAGS = asyncssh.FXF_WRITE | asyncssh.FXF_CREAT | asyncssh.FXF_TRUNC | asyncssh.FXF_APPEND


def denied(reason: str) -> SFTPError:
    return SFTPError(asyncssh.FX_PERMISSION_DENIED, reason)


def is_temp(name: str) -> bool:
    return name.startswith(".") or name.lower().endswith(TEMP_SUFFIXES)


def load_or_create_host_key(path: Path) -> asyncssh.SSHKey:
    """The region's persistent host key: made once (0600), never regenerated."""
    if path.exists():
        return asyncssh.read_private_key(str(path))
    key = asyncssh.generate_private_key("ssh-ed25519")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.export_private_key())
    return key


@dataclass(frozen=True)
class Account:
    client_id: str
    client: ClientConfig
    keys: frozenset[bytes]  # public key blobs

    @property
    def password_hash(self) -> str | None:
        return self.client.sftp.password_hash if self.client.sftp else None


@dataclass(frozen=True)
class Upload:
    """A completed upload waiting in the SFTP spool."""

    id: str
    path: Path
    meta: dict[str, Any]


class SftpSpool:
    """``incoming/<id>/`` holds one uploaded file and ``meta.json``; the rename of the
    folder from ``tmp/`` is the commit point. An upload that cannot be handled moves to
    ``dead/<id>/`` with ``reason.json``; ``requeue`` puts it back."""

    def __init__(self, root: Path, *, owner: bool = True) -> None:
        self.incoming, self.tmp, self.dead = root / "incoming", root / "tmp", root / "dead"
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
        found = []
        for folder in sorted(self.incoming.iterdir()):
            try:
                meta = json.loads((folder / "meta.json").read_text())
                path = folder / meta["name"]
            except FileNotFoundError:
                continue  # finished meanwhile
            except (OSError, ValueError, KeyError, TypeError):
                meta, path = {"damaged": True}, folder
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


class SftpService:
    """What every SFTP session shares: accounts, homes, names in flight, the spool."""

    def __init__(self, *, config: SftpConfig, root: Path, clients: Mapping[str, ClientConfig],
                 store: SqliteBatchStore, spool: SftpSpool, defender: Defender,
                 on_upload: Callable[[Upload], None] | None = None) -> None:
        self.config = config
        self.root = root
        self.clients = clients
        self.store = store
        self.spool = spool
        self.defender = defender
        # Set by the wiring once the worker exists (the worker needs the service too).
        self.on_upload: Callable[[Upload], None] = on_upload or (lambda upload: None)
        self.accounts: dict[str, Account] = {}
        for client_id, client in clients.items():
            if client.sftp is None:
                continue
            keys = frozenset(asyncssh.import_public_key(k).public_data
                             for k in client.sftp.authorized_keys)
            self.accounts[client.sftp.username] = Account(client_id, client, keys)
            self.ensure_home(client_id, client)
        self._lock = threading.Lock()
        self.ghosts: dict[tuple[str, str, str], asyncssh.SFTPAttrs] = {}
        # Checked against for unknown users, so that they take as long as known ones.
        self.dummy_hash = hash_password(secrets.token_urlsafe(16))
        self.connections: set[asyncssh.SSHServerConnection] = set()
        self._in_flight: dict[tuple[str, str, str], str] = {}
        for upload in spool.pending():
            m = upload.meta
            if not m.get("damaged"):  # a damaged entry holds no name: it is dead-lettered
                self._in_flight[(m["client"], m["project"], m["name"])] = "spooled"

    def home(self, client_id: str) -> Path:
        return self.root / client_id

    def downloads(self, client_id: str, project: str) -> Path:
        client = self.clients[client_id]
        flat = client.sftp is not None and client.sftp.flat
        home = self.home(client_id)
        return home / "Downloads" if flat else home / project / "Downloads"

    def _sweep(self, area: str, now: float, max_age: Callable[[ProjectConfig], float],
               wanted: Callable[[str], bool]) -> int:
        """Delete regular files in every account's ``area`` older than ``max_age``
        seconds whose names ``wanted`` accepts; the number deleted."""
        removed = 0
        for client_id, client in self.clients.items():
            if client.sftp is None:
                continue
            for project_id, project in client.projects.items():
                folder = self.downloads(client_id, project_id).with_name(area)
                if not folder.is_dir():
                    continue
                cutoff = now - max_age(project)
                for path in folder.iterdir():
                    info = path.lstat()
                    if wanted(path.name) and stat.S_ISREG(info.st_mode) \
                            and info.st_mtime < cutoff:
                        path.unlink(missing_ok=True)
                        removed += 1
        return removed

    def sweep_downloads(self, now: float) -> int:
        """Delete results older than their project's retention (not files being written)."""
        return self._sweep("Downloads", now, lambda p: p.retention_days * 86400,
                           lambda name: not name.startswith("."))

    def ensure_home(self, client_id: str, client: ClientConfig) -> None:
        home = self.home(client_id)
        flat = client.sftp is not None and client.sftp.flat
        for project in client.projects:
            base = home if flat else home / project
            for area in ("Uploads", "Downloads"):
                (base / area).mkdir(parents=True, exist_ok=True)

    def reserve(self, client_id: str, project: str, name: str, owner: str) -> None:
        """Refuse a name a batch holds or that is being received; else hold it."""
        first = self.store.held_since(client_id, project, name)
        if first is not None:
            when = first.strftime("%Y-%m-%d %H:%M:%S UTC")
            raise SFTPError(asyncssh.FX_FAILURE,
                            f"a file named {name} was received at {when}; "
                            "upload it under a new name")
        with self._lock:
            holder = self._in_flight.get((client_id, project, name))
            if holder == "spooled":
                raise SFTPError(asyncssh.FX_FAILURE,
                                f"a file named {name} was received and is being processed; "
                                "if it fails you may send it again under this name, else "
                                "use a new name")
            if holder is not None and holder != owner:
                raise SFTPError(asyncssh.FX_FAILURE,
                                f"a file named {name} is being received already; "
                                "upload it under a new name")
            self._in_flight[(client_id, project, name)] = owner

    def spooled(self, client_id: str, project: str, name: str,
                attrs: asyncssh.SFTPAttrs) -> None:
        """The upload is complete and waits for its batch: nobody may send the name again,
        not even the session that sent it, until the batch has ended; meanwhile the name
        still answers stat with what was uploaded (rclone stats and sets the time of what
        it just wrote)."""
        with self._lock:
            self._in_flight[(client_id, project, name)] = "spooled"
            self.ghosts[(client_id, project, name)] = attrs

    def ghost(self, client_id: str, project: str, name: str) -> asyncssh.SFTPAttrs | None:
        with self._lock:
            return self.ghosts.get((client_id, project, name))

    def sweep_temp_uploads(self, now: float) -> int:
        """Delete temporary-named uploads older than ``temp_max_age_hours``."""
        hours = self.config.temp_max_age_hours
        return self._sweep("Uploads", now, lambda _: hours * 3600, is_temp)

    def release(self, client_id: str, project: str, name: str, owner: str) -> None:
        with self._lock:
            if self._in_flight.get((client_id, project, name)) == owner:
                del self._in_flight[(client_id, project, name)]

    def done(self, client_id: str, project: str, name: str) -> None:
        with self._lock:
            self._in_flight.pop((client_id, project, name), None)
            self.ghosts.pop((client_id, project, name), None)


class _SshConnection(asyncssh.SSHServer):
    """One SSH connection: the defender's view of logins."""

    def __init__(self, service: SftpService) -> None:
        self.service = service
        self.ip = "?"
        self.authenticated = False
        self.attempted = False
        self.conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        self.service.connections.add(conn)
        peer = conn.get_extra_info("peername")
        self.ip = str(peer[0]) if peer else "?"
        if self.service.defender.banned(self.ip):
            log.info("refused connection from banned %s", self.ip)
            conn.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.service.connections.discard(self.conn)
        if not self.authenticated and not self.attempted:
            self.service.defender.record(self.ip, Event.NO_AUTH)

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return True

    async def validate_password(self, username: str, password: str) -> bool:
        self.attempted = True
        account = self.service.accounts.get(username)
        stored = account.password_hash if account else None
        # An unknown user (or a key-only account) costs the same scrypt as a known one:
        # the answer's timing must not tell which usernames exist.
        checked = await asyncio.to_thread(verify_password, password,
                                          stored or self.service.dummy_hash)
        ok = stored is not None and checked
        if not ok:
            log.info("failed password login for %r from %s", username, self.ip)
            if self.service.defender.record(self.ip, Event.INVALID) and self.conn is not None:
                self.conn.close()
        return ok

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        account = self.service.accounts.get(username)
        return account is not None and key.public_data in account.keys

    def auth_completed(self) -> None:
        self.authenticated = True
        self.service.defender.record(self.ip, Event.VALID)


@dataclass
class _Open:
    """A file handle we gave out, and what it is for."""

    file: Any
    real: Path
    project: str | None
    name: str
    upload: bool
    broken: bool = False  # a write failed (a full disk): the upload cannot complete

    # asyncssh's default fstat, fsync and fstatvfs treat the handle as a file.
    def fileno(self) -> int:
        return int(self.file.fileno())

    def flush(self) -> None:
        self.file.flush()


def _open_nofollow(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_NOFOLLOW, 0o600)
    except FileNotFoundError as exc:
        raise SFTPError(asyncssh.FX_NO_SUCH_FILE, "no such file") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise denied("symbolic links are not allowed") from exc
        raise


class ClientSftp(asyncssh.SFTPServer):
    """One client's view: its own tree, the area rules, uploads into the spool."""

    def __init__(self, chan: asyncssh.SSHServerChannel[bytes], service: SftpService) -> None:
        username = chan.get_extra_info("username")
        self.service = service
        self.account = service.accounts[username]
        self.session = uuid.uuid4().hex
        self.home = service.home(self.account.client_id).resolve()
        self.flat = bool(self.account.client.sftp and self.account.client.sftp.flat)
        super().__init__(chan, chroot=str(self.home).encode())

    # -- paths ---------------------------------------------------------------------

    def _virtual(self, path: bytes) -> str:
        text = path.decode("utf-8", "surrogateescape")
        parts = [p for p in text.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise denied("paths with .. are not allowed")
        return "/" + "/".join(parts)

    def _real(self, virtual: str) -> Path:
        real = self.home
        for part in [p for p in virtual.split("/") if p]:
            real = real / part
            try:
                if stat.S_ISLNK(os.lstat(real).st_mode):
                    raise denied("symbolic links are not allowed")
            except FileNotFoundError:
                break
        return self.home / virtual.lstrip("/")

    def map_path(self, path: bytes) -> bytes:
        return str(self._real(self._virtual(path))).encode("utf-8", "surrogateescape")

    def _place(self, path: bytes) -> tuple[str | None, str | None, str]:
        """(project, area, file name) of a virtual path; area None outside the areas."""
        parts = [p for p in self._virtual(path).split("/") if p]
        projects = list(self.account.client.projects)
        if self.flat:
            project, rest = projects[0], parts
        else:
            if not parts or parts[0] not in projects:
                return None, None, "/".join(parts)
            project, rest = parts[0], parts[1:]
        if rest and rest[0] in ("Uploads", "Downloads"):
            return project, rest[0], "/".join(rest[1:])
        return project, None, "/".join(rest)

    async def scandir(self, path: bytes) -> AsyncIterator[asyncssh.SFTPName]:
        """As asyncssh's, but "." and ".." describe the listed folder itself: a ".." path
        is never mapped (and would be refused)."""
        real = self.map_path(path)
        attrs = asyncssh.SFTPAttrs.from_local(os.lstat(real))
        for name in (b".", b".."):
            yield asyncssh.SFTPName(name, attrs=attrs)
        with os.scandir(real) as entries:
            for entry in entries:
                yield asyncssh.SFTPName(
                    os.fsencode(entry.name),
                    attrs=asyncssh.SFTPAttrs.from_local(entry.stat(follow_symlinks=False)))

    # -- files -------------------------------------------------------------------------

    async def open(self, path: bytes, pflags: int, attrs: asyncssh.SFTPAttrs) -> object:
        project, area, name = self._place(path)
        real = self._real(self._virtual(path))
        if pflags & WRITE_FLAGS:
            if area != "Uploads" or not name or "/" in name or project is None:
                raise denied("files can be uploaded to Uploads only")
            if not is_temp(name):
                if self.account.client.sftp is not None \
                        and self.account.client.sftp.complete_on == "rename":
                    raise denied(f"this account completes an upload when a temporary name "
                                 f"is renamed to the final one: upload to {name}.filepart "
                                 "(or another temporary name) and rename it")
                await self._admit(project, name)
            # O_NOFOLLOW: a link planted after the lstat checks is still not followed.
            fd = _open_nofollow(real, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            return _Open(os.fdopen(fd, "wb"), real, project, name, upload=True)
        if pflags & asyncssh.FXF_READ:
            if area != "Downloads" or not name or "/" in name:
                raise denied("files can be read from Downloads only")
            if name.startswith("."):
                raise denied("this file is still being written")
            fd = _open_nofollow(real, os.O_RDONLY)
            return _Open(os.fdopen(fd, "rb"), real, project, name, upload=False)
        raise denied("unsupported open mode")

    async def _admit(self, project: str, name: str) -> None:
        """Refuse at once what the name alone shows to be wrong (type, name rule,
        another project, a name held); the reason goes back in the status and the log."""
        client_id = self.account.client_id
        try:
            self._check_name(project, name)
            await asyncio.to_thread(self.service.reserve, client_id, project, name,
                                    self.session)
        except SFTPError as exc:
            log.info("refused upload of %r for client %s project %s: %s", name, client_id,
                     project, exc.reason)
            raise

    def _check_name(self, project: str, name: str) -> None:
        ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
        if ext not in ALLOWED:
            allowed = " ".join(f".{e}" for e in ALLOWED)
            raise denied(f"{name} is not a data file; allowed types: {allowed}")
        if ext not in DATA_EXTENSIONS:
            return  # a ZIP or PGP file: the name that counts is the one inside
        try:
            data = parse_data_name(name)
            select_project(self.service.clients, self.account.client_id, project, data)
        except ClientInputError as exc:
            raise denied(exc.message) from exc

    def read(self, file_obj: object, offset: int, size: int) -> bytes:
        assert isinstance(file_obj, _Open)
        file_obj.file.seek(offset)
        return bytes(file_obj.file.read(size))

    def write(self, file_obj: object, offset: int, data: bytes) -> int:
        assert isinstance(file_obj, _Open)
        try:
            file_obj.file.seek(offset)
            return int(file_obj.file.write(data))
        except OSError as exc:
            file_obj.broken = True
            log.warning("upload of %s failed: %s", file_obj.name, exc.strerror)
            raise SFTPError(asyncssh.FX_FAILURE, STORAGE_REFUSAL) from exc

    async def close(self, file_obj: object) -> None:
        assert isinstance(file_obj, _Open)
        try:
            file_obj.file.close()  # flushes: on a full disk this fails too
        except OSError as exc:
            file_obj.broken = True
            log.warning("upload of %s failed at close: %s", file_obj.name, exc.strerror)
        if not file_obj.upload:
            return
        if file_obj.broken:
            # Nothing half-written stays, and the name is free for the upload again.
            file_obj.real.unlink(missing_ok=True)
            if file_obj.project is not None:
                self.service.release(self.account.client_id, file_obj.project, file_obj.name,
                                     self.session)
            raise SFTPError(asyncssh.FX_FAILURE, STORAGE_REFUSAL)
        if self.channel.is_closing():
            # The connection dropped with the file open: a cut-off transfer.
            log.info("cut-off upload of %s discarded", file_obj.name)
            file_obj.real.unlink(missing_ok=True)
            if file_obj.project is not None:
                self.service.release(self.account.client_id, file_obj.project, file_obj.name,
                                     self.session)
            return
        if not is_temp(file_obj.name):
            await self._complete(file_obj.real, file_obj.project or "", file_obj.name)

    async def _complete(self, real: Path, project: str, name: str) -> None:
        meta = {"client": self.account.client_id, "project": project, "name": name}
        attrs = asyncssh.SFTPAttrs.from_local(os.lstat(real))
        try:
            upload = await asyncio.to_thread(self.service.spool.adopt, real, name, meta)
        except OSError as exc:
            log.exception("could not spool upload %s", name)
            real.unlink(missing_ok=True)
            self.service.release(self.account.client_id, project, name, self.session)
            raise SFTPError(asyncssh.FX_FAILURE,
                            STORAGE_REFUSAL if exc.errno in STORAGE_ERRNOS else
                            "the upload could not be stored; please upload it again") from exc
        self.service.spooled(self.account.client_id, project, name, attrs)
        self.service.on_upload(upload)

    async def rename(self, oldpath: bytes, newpath: bytes) -> None:
        project, area, old = self._place(oldpath)
        new_project, new_area, new = self._place(newpath)
        if area != "Uploads" or new_area != "Uploads" or project != new_project or \
                project is None or "/" in old or "/" in new or not new:
            raise denied("renaming is allowed within Uploads only")
        real_old = self._real(self._virtual(oldpath))
        if not real_old.is_file():
            raise SFTPError(asyncssh.FX_NO_SUCH_FILE, "no such file")
        if is_temp(new):
            real_old.rename(self._real(self._virtual(newpath)))
            return
        await self._admit(project, new)
        await self._complete(real_old, project, new)

    async def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        await self.rename(oldpath, newpath)

    def remove(self, path: bytes) -> None:
        _, area, name = self._place(path)
        abandoned = area == "Uploads" and is_temp(name)  # a client's own unfinished upload
        if (area != "Downloads" and not abandoned) or not name or "/" in name:
            raise denied("files can be deleted from Downloads (and temporary uploads from "
                         "Uploads) only")
        real = self._real(self._virtual(path))
        try:
            real.unlink()
        except FileNotFoundError as exc:
            raise SFTPError(asyncssh.FX_NO_SUCH_FILE, "no such file") from exc

    def _ghost(self, path: bytes) -> asyncssh.SFTPAttrs | None:
        project, area, name = self._place(path)
        if area != "Uploads" or project is None or not name or "/" in name:
            return None
        return self.service.ghost(self.account.client_id, project, name)

    def stat(self, path: bytes) -> asyncssh.SFTPAttrs:
        try:
            return asyncssh.SFTPAttrs.from_local(Path(os.fsdecode(self.map_path(path))).stat())
        except FileNotFoundError:
            ghost = self._ghost(path)
            if ghost is None:
                raise
            return ghost

    def lstat(self, path: bytes) -> asyncssh.SFTPAttrs:
        try:
            return asyncssh.SFTPAttrs.from_local(
                Path(os.fsdecode(self.map_path(path))).lstat())
        except FileNotFoundError:
            ghost = self._ghost(path)
            if ghost is None:
                raise
            return ghost

    def setstat(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        """Clients set times after an upload (also of one already taken in); accepted
        and ignored."""

    def fsetstat(self, file_obj: object, attrs: asyncssh.SFTPAttrs) -> None:
        """Accepted and ignored, as setstat."""

    def mkdir(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        raise denied("folders cannot be created")

    def rmdir(self, path: bytes) -> None:
        raise denied("folders cannot be removed")

    def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        raise denied("symbolic links are not allowed")

    def link(self, oldpath: bytes, newpath: bytes) -> None:
        raise denied("links are not allowed")

    def readlink(self, path: bytes) -> bytes:
        raise denied("symbolic links are not allowed")


async def close_sessions(service: SftpService, timeout: float = 10.0) -> None:
    """Close every live session (an upload still open is then a cut-off transfer)."""
    sessions = list(service.connections)
    for conn in sessions:
        conn.close()
    for conn in sessions:
        try:
            await asyncio.wait_for(conn.wait_closed(), timeout)
        except TimeoutError:
            log.warning("an SFTP session did not close in %.0f s", timeout)


async def start_sftp(service: SftpService, host_key: asyncssh.SSHKey) -> Any:
    config = service.config
    return await asyncssh.create_server(
        lambda: _SshConnection(service), config.host, config.port,
        server_host_keys=[host_key],
        sftp_factory=lambda chan: ClientSftp(chan, service),
        allow_scp=False, login_timeout=config.login_timeout_seconds,
        encryption_algs=["aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                         "chacha20-poly1305@openssh.com", "aes128-ctr", "aes256-ctr"],
    )


class SftpWorker:
    """Runs the batch core on spooled uploads; results land in the project's Downloads."""

    def __init__(self, service: SftpService, processor: BatchProcessor, *,
                 processing: ProcessingConfig | None = None,
                 alerts: OperatorAlerts | None = None) -> None:
        self.service = service
        self.processor = processor
        self.alerts = alerts
        processing = processing or ProcessingConfig()
        self._worker: QueueWorker[Upload] = QueueWorker(
            "sftp", handle=self.handle, pending=service.spool.pending,
            ident=lambda upload: upload.id,
            fair_key=lambda upload: upload.meta.get("client"),
            workers=processing.workers, max_attempts=processing.max_attempts,
            retry_seconds=processing.retry_seconds, on_dead=self.dead_letter)
        self.submit = self._worker.submit
        self.run = self._worker.run

    @property
    def queue(self) -> QueueWorker[Upload]:
        return self._worker

    def handle(self, upload: Upload) -> None:
        m = upload.meta
        if m.get("damaged"):
            raise DamagedEntryError(f"spool entry {upload.id} has no readable meta.json")
        downloads = self.service.downloads(m["client"], m["project"])
        client = self.service.clients[m["client"]]
        # The client's agreed ZIP password opens a password ZIP (or one inside PGP) here
        # too; without one, only plain ZIPs open.
        password = client.zip_password.reveal() if client.zip_password else None
        outcome = self.processor.process(
            Submission(path=upload.path, received_name=m["name"], channel="sftp",
                       client_id=m["client"], project_id=m["project"], intake_id=upload.id,
                       zip_password=password),
            downloads,
        )
        if outcome.state is BatchState.FAILED and outcome.errors is None:
            # A failure before the batch could write its error file (a ZIP or PGP file
            # refused, say): the client still finds the reason where results appear.
            self._error_file(downloads, m["client"], m["project"], m["name"],
                             outcome.batch.reason or "the file could not be processed")
        self.service.spool.finish(upload)
        self.service.done(m["client"], m["project"], m["name"])

    def dead_letter(self, upload: Upload, exc: BaseException, attempts: int) -> None:
        """An upload that cannot be processed: the operator is alerted, the client finds
        an error file in Downloads, and the upload waits in the dead-letter folder."""
        m = upload.meta
        client, project, name = m.get("client"), m.get("project"), m.get("name")
        region = self.processor.region_id
        alerted = self.alerts is not None and self.alerts.dead_letter(
            region=region, channel="sftp", client=client if isinstance(client, str) else None,
            error=type(exc).__name__, entry_id=upload.id, attempts=attempts, what="upload")
        if isinstance(client, str) and isinstance(project, str) and isinstance(name, str) \
                and client in self.service.clients \
                and project in self.service.clients[client].projects:
            told = ("our operators have been alerted and will process it once the fault is "
                    "fixed; the results will then appear here, so you need not upload it "
                    "again" if alerted else
                    "please upload it again later under a new name")
            self._error_file(self.service.downloads(client, project), client, project, name,
                             f"we could not process this file because of a fault on our "
                             f"side (reference {upload.id}); {told}")
            self.service.done(client, project, name)
        self.service.spool.dead_letter(upload, {
            "error": type(exc).__name__, "attempts": attempts, "channel": "sftp",
            "client": client, "alerted": alerted, "at": time.time()})

    def _error_file(self, downloads: Path, client_id: str, project_id: str, received: str,
                    reason: str) -> None:
        project = self.service.clients[client_id].projects[project_id]
        if not project.error_file:
            return
        stem = split_extension(strip_pgp(received)[0])[0]
        final = downloads / f"{project.purl_prefix}{stem}{project.purl_suffix}_errors.csv"
        with AtomicFile(final, no_clobber=False, mode=self.processor.result_mode) as out:
            text = io.StringIO()
            csv.writer(text, lineterminator="\n").writerows([("row", "column", "reason"),
                                                             ("", "", reason)])
            out.file.write(text.getvalue().encode("utf-8"))
            out.commit()
