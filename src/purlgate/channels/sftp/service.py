"""What every SFTP session shares: accounts, homes, names being received, sweeps.

A name moves through ``NameState``: RECEIVING (a session is writing it; another session
is refused) -> SPOOLED (complete, waiting for its batch; every session is refused, and
the name still answers stat) -> released when its batch ends (or the upload failed).
A name a batch holds in the store is refused with the time it arrived.

With several instances (``share``), a name being received is also leased in the
region's database, so that two instances never write one file of a shared Uploads
folder at once; a spooled name is then guarded by its spool entry and the batch's name
claim, which every instance sees.
"""

from __future__ import annotations

import contextlib
import secrets
import stat
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import asyncssh
from asyncssh import SFTPError

from purlgate.channels.defender import Defender
from purlgate.channels.sftp.spool import SftpSpool, Upload
from purlgate.config import ClientConfig, ProjectConfig, SftpConfig
from purlgate.core.leases import Leases
from purlgate.core.lifecycle import RegionStore
from purlgate.errors import DatabaseUnavailableError, StorageError
from purlgate.passwords import hash_password

# Temporary names that clients upload to and then rename: WinSCP ".filepart", rclone
# ".<8 hex>.partial", FileZilla/others ".part" and ".tmp"; lftp's ".in.<name>." and any
# other hidden name start with a dot.
TEMP_SUFFIXES = (".filepart", ".partial", ".part", ".tmp")


def is_temp(name: str) -> bool:
    return name.startswith(".") or name.lower().endswith(TEMP_SUFFIXES)


# A project's folders: Uploads (processed), Downloads (results), Validate (uploads only
# checked: the report appears in Downloads; see core/validation.py).
VALIDATE = "Validate"
AREAS = ("Uploads", "Downloads", VALIDATE)
INTAKE = ("Uploads", VALIDATE)


def held_as(area: str, name: str) -> str:
    """The name an upload holds while it is received and waits: a file checked in
    Validate never holds (nor is refused for) the name a real upload would."""
    return f"{VALIDATE}/{name}" if area == VALIDATE else name


class NameState(Enum):
    RECEIVING = "receiving"  # a session is writing it
    SPOOLED = "spooled"  # complete: in the spool, waiting for its batch to end


# What another session is told of a name in each state.
REFUSALS: Mapping[NameState, str] = {
    NameState.RECEIVING: "a file named {name} is being received already; upload it under "
                         "a new name",
    NameState.SPOOLED: "a file named {name} was received and is being processed; if it "
                       "fails you may send it again under this name, else use a new name",
}
UNAVAILABLE = ("the gateway cannot take uploads right now (its database is unreachable); "
               "nothing was stored: please upload the file again in a few minutes")


@dataclass(frozen=True)
class _Hold:
    state: NameState
    session: str | None  # the session receiving it (RECEIVING only)
    entry: Path | None = None  # its spool entry (SPOOLED only)


@dataclass(frozen=True)
class Account:
    client_id: str
    client: ClientConfig
    keys: frozenset[bytes]  # public key blobs

    @property
    def password_hash(self) -> str | None:
        return self.client.sftp.password_hash if self.client.sftp else None


class SftpService:
    """What every SFTP session shares: accounts, homes, names in flight, the spool."""

    def __init__(self, *, config: SftpConfig, root: Path, clients: Mapping[str, ClientConfig],
                 store: RegionStore, spool: SftpSpool, defender: Defender,
                 on_upload: Callable[[Upload], None] | None = None) -> None:
        self.config = config
        self.root = root
        self.clients = clients
        self.store = store
        self.spool = spool
        self.defender = defender
        # Set by the wiring once the worker exists (the worker needs the service too).
        self.on_upload: Callable[[Upload], None] = on_upload or (lambda upload: None)
        # (client, project, name, reason) of an upload refused at open: a note in
        # Downloads, since many clients do not print the SFTP status text.
        self.on_refused: Callable[[str, str, str, str], None] = lambda *refusal: None
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
        self._in_flight: dict[tuple[str, str, str], _Hold] = {}
        for upload in spool.pending():
            m = upload.meta
            if not m.get("damaged"):  # a damaged entry holds no name: it is dead-lettered
                held = held_as(VALIDATE if m.get("validate") else "Uploads", m["name"])
                self._in_flight[(m["client"], m["project"], held)] = _Hold(
                    NameState.SPOOLED, None, upload.path.parent)
        self.leases: Leases | None = None

    def share(self, leases: Leases) -> None:
        """Other instances serve the same homes (see the module docstring)."""
        self.leases = leases

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
                    try:
                        info = path.lstat()
                    except FileNotFoundError:
                        continue  # gone meanwhile (another instance's sweep, the client)
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
            for area in AREAS:
                (base / area).mkdir(parents=True, exist_ok=True)

    def reserve(self, client_id: str, project: str, name: str, owner: str) -> None:
        """Refuse a name a batch holds or that is being received; else hold it. A
        Validate name (``held_as``) is only checked against other uploads of it."""
        try:
            validating = name.startswith(f"{VALIDATE}/")
            first = None if validating else self.store.held_since(client_id, project, name)
        except DatabaseUnavailableError as exc:
            raise SFTPError(asyncssh.FX_FAILURE, UNAVAILABLE) from exc
        if first is not None:
            when = first.strftime("%Y-%m-%d %H:%M:%S UTC")
            raise SFTPError(asyncssh.FX_FAILURE,
                            f"a file named {name} was received at {when}; "
                            "upload it under a new name")
        key = (client_id, project, name)
        with self._lock:
            hold = self._in_flight.get(key)
            if hold is not None and hold.entry is not None and not hold.entry.exists():
                hold = None  # its batch ran on another instance, which let it go there
            if hold is not None and hold.session != owner:
                raise SFTPError(asyncssh.FX_FAILURE, REFUSALS[hold.state].format(name=name))
            self._in_flight[key] = _Hold(NameState.RECEIVING, owner)
        if self.leases is None:
            return
        try:
            mine = self.leases.claim("upload", "/".join(key))
        except DatabaseUnavailableError as exc:
            self.release(client_id, project, name, owner)
            raise SFTPError(asyncssh.FX_FAILURE, UNAVAILABLE) from exc
        if not mine:  # another instance is receiving it
            self.release(client_id, project, name, owner)
            raise SFTPError(asyncssh.FX_FAILURE,
                            REFUSALS[NameState.RECEIVING].format(name=name))

    def spooled(self, client_id: str, project: str, name: str,
                attrs: asyncssh.SFTPAttrs, entry: Path | None = None) -> None:
        """The upload is complete and waits for its batch: nobody may send the name again,
        not even the session that sent it, until the batch has ended; meanwhile the name
        still answers stat with what was uploaded (rclone stats and sets the time of what
        it just wrote)."""
        with self._lock:
            self._in_flight[(client_id, project, name)] = _Hold(NameState.SPOOLED, None, entry)
            self.ghosts[(client_id, project, name)] = attrs
        self._let_go(client_id, project, name)

    def ghost(self, client_id: str, project: str, name: str) -> asyncssh.SFTPAttrs | None:
        with self._lock:
            return self.ghosts.get((client_id, project, name))

    def sweep_temp_uploads(self, now: float) -> int:
        """Delete temporary-named uploads older than ``temp_max_age_hours``."""
        hours = self.config.temp_max_age_hours
        return sum(self._sweep(area, now, lambda _: hours * 3600, is_temp)
                   for area in INTAKE)

    def release(self, client_id: str, project: str, name: str, owner: str) -> None:
        with self._lock:
            hold = self._in_flight.get((client_id, project, name))
            if hold is None or hold.state is not NameState.RECEIVING or hold.session != owner:
                return
            del self._in_flight[(client_id, project, name)]
        self._let_go(client_id, project, name)

    def _let_go(self, client_id: str, project: str, name: str) -> None:
        """Give the name's lease back (other instances may receive it again); a lease
        that cannot be given back now runs out by itself."""
        if self.leases is None:
            return
        with contextlib.suppress(StorageError):
            self.leases.release("upload", f"{client_id}/{project}/{name}")

    def done(self, client_id: str, project: str, name: str) -> None:
        with self._lock:
            self._in_flight.pop((client_id, project, name), None)
            self.ghosts.pop((client_id, project, name), None)
