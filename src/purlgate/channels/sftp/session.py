"""One SFTP session: SSH logins (password, key, the defender's view), the client's
chrooted tree, the area rules, and an upload's completion into the spool.

No path leads out: ``..`` is refused, every component is checked with lstat so a
planted symlink is refused too, and symlinks cannot be made. ``Uploads``: create, write,
rename, list. ``Downloads``: list, read, delete. Nothing else. An upload completes when
the client closes a file it wrote under a final name, or renames a temporary name to a
final one; a transfer cut off mid-way is deleted, never processed.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
from asyncssh import SFTPError

from purlgate.channels.defender import Event
from purlgate.channels.sftp.service import AREAS, INTAKE, VALIDATE, SftpService, held_as, is_temp
from purlgate.core.naming import (
    ARCHIVE_EXTENSIONS,
    DATA_EXTENSIONS,
    PGP_EXTENSIONS,
    parse_data_name,
    select_project,
)
from purlgate.errors import STORAGE_ERRNOS, ClientInputError
from purlgate.passwords import verify_password

log = logging.getLogger("purlgate.sftp")
STORAGE_REFUSAL = ("the server is out of disk space: nothing of this upload was kept; "
                   "please upload the file again later under the same name")
ALLOWED = (*DATA_EXTENSIONS, *ARCHIVE_EXTENSIONS, *PGP_EXTENSIONS)
WRITE_FLAGS = asyncssh.FXF_WRITE | asyncssh.FXF_CREAT | asyncssh.FXF_TRUNC | asyncssh.FXF_APPEND


def denied(reason: str) -> SFTPError:
    return SFTPError(asyncssh.FX_PERMISSION_DENIED, reason)


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
    area: str = "Uploads"  # or "Validate": checked, never processed

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
        peer = chan.get_extra_info("peername")
        self.service = service
        self.account = service.accounts[username]
        self.source = f"{username} from {peer[0] if peer else '?'}"  # the audit trail
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
        if rest and rest[0] in AREAS:
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
            if area not in INTAKE or not name or "/" in name or project is None:
                raise denied("files can be uploaded to Uploads (or to Validate, to have "
                             "them checked only) only")
            if not is_temp(name):
                if self.account.client.sftp is not None \
                        and self.account.client.sftp.complete_on == "rename":
                    raise denied(f"this account completes an upload when a temporary name "
                                 f"is renamed to the final one: upload to {name}.filepart "
                                 "(or another temporary name) and rename it")
                await self._admit(project, area, name)
            # O_NOFOLLOW: a link planted after the lstat checks is still not followed.
            fd = _open_nofollow(real, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            return _Open(os.fdopen(fd, "wb"), real, project, name, upload=True, area=area)
        if pflags & asyncssh.FXF_READ:
            if area != "Downloads" or not name or "/" in name:
                raise denied("files can be read from Downloads only")
            if name.startswith("."):
                raise denied("this file is still being written")
            fd = _open_nofollow(real, os.O_RDONLY)
            return _Open(os.fdopen(fd, "rb"), real, project, name, upload=False)
        raise denied("unsupported open mode")

    async def _admit(self, project: str, area: str, name: str) -> None:
        """Refuse at once what the name alone shows to be wrong (type, name rule,
        another project, a name held); the reason goes back in the status and the log."""
        client_id = self.account.client_id
        try:
            self._check_name(project, name)
            await asyncio.to_thread(self.service.reserve, client_id, project,
                                    held_as(area, name), self.session)
        except SFTPError as exc:
            log.info("refused upload of %r for client %s project %s: %s", name, client_id,
                     project, exc.reason)
            await asyncio.to_thread(self.service.on_refused, client_id, project, name,
                                    exc.reason)
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
                await asyncio.to_thread(self.service.release, self.account.client_id,
                                        file_obj.project,
                                        held_as(file_obj.area, file_obj.name), self.session)
            raise SFTPError(asyncssh.FX_FAILURE, STORAGE_REFUSAL)
        if self.channel.is_closing():
            # The connection dropped with the file open: a cut-off transfer.
            log.info("cut-off upload of %s discarded", file_obj.name)
            file_obj.real.unlink(missing_ok=True)
            if file_obj.project is not None:
                await asyncio.to_thread(self.service.release, self.account.client_id,
                                        file_obj.project,
                                        held_as(file_obj.area, file_obj.name), self.session)
            return
        if not is_temp(file_obj.name):
            await self._complete(file_obj.real, file_obj.project or "", file_obj.area,
                                 file_obj.name)

    async def _complete(self, real: Path, project: str, area: str, name: str) -> None:
        meta: dict[str, object] = {"client": self.account.client_id, "project": project,
                                   "name": name, "source": self.source}
        if area == VALIDATE:
            meta["validate"] = True
        held = held_as(area, name)
        attrs = asyncssh.SFTPAttrs.from_local(os.lstat(real))
        try:
            upload = await asyncio.to_thread(self.service.spool.adopt, real, name, meta)
        except OSError as exc:
            log.exception("could not spool upload %s", name)
            real.unlink(missing_ok=True)
            await asyncio.to_thread(self.service.release, self.account.client_id, project,
                                    held, self.session)
            raise SFTPError(asyncssh.FX_FAILURE,
                            STORAGE_REFUSAL if exc.errno in STORAGE_ERRNOS else
                            "the upload could not be stored; please upload it again") from exc
        await asyncio.to_thread(self.service.spooled, self.account.client_id, project, held,
                                attrs, upload.path.parent)
        self.service.on_upload(upload)

    async def rename(self, oldpath: bytes, newpath: bytes) -> None:
        project, area, old = self._place(oldpath)
        new_project, new_area, new = self._place(newpath)
        if area not in INTAKE or new_area != area or project != new_project or \
                project is None or "/" in old or "/" in new or not new:
            raise denied("renaming is allowed within Uploads (or within Validate) only")
        real_old = self._real(self._virtual(oldpath))
        if not real_old.is_file():
            raise SFTPError(asyncssh.FX_NO_SUCH_FILE, "no such file")
        if is_temp(new):
            real_old.rename(self._real(self._virtual(newpath)))
            return
        await self._admit(project, area, new)
        await self._complete(real_old, project, area, new)

    async def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        await self.rename(oldpath, newpath)

    def remove(self, path: bytes) -> None:
        _, area, name = self._place(path)
        abandoned = area in INTAKE and is_temp(name)  # a client's own unfinished upload
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
