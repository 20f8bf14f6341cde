"""A real Dovecot for the IMAP tests, started from a temporary config on 127.0.0.1.

As root, Dovecot refuses uid 0 for mail: mail runs as the system user ``mail``, and the
mail folder lives in a world-traversable temporary directory it can reach. As another
user, everything runs as that user. One server per test session; one user per test.
"""

from __future__ import annotations

import getpass
import imaplib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.tls_helpers import self_signed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Dovecot:
    root: Path
    port: int  # plain IMAP, STARTTLS offered
    process: subprocess.Popen[bytes]
    users: list[tuple[str, str]]
    tls_port: int  # implicit TLS (imaps)
    cert: Path  # the CA to trust for both

    def restart(self) -> None:
        """Stop the server and start it again on the same ports and mailboxes."""
        self.process.terminate()
        self.process.wait(timeout=15)
        self.process = _start(self.root, self.port)

    def add_user(self) -> tuple[str, str]:
        """A fresh mailbox. Users are written before start: Dovecot re-reads the
        passwd-file by mtime, which two writes in one second would not change."""
        return self.users.pop()

    def client(self, user: str, password: str) -> imaplib.IMAP4:
        c = imaplib.IMAP4("127.0.0.1", self.port)
        c.login(user, password)
        return c

    def append(self, user: str, password: str, raw: bytes, folder: str = "INBOX") -> None:
        c = self.client(user, password)
        try:
            status, _ = c.append(folder, None, None, raw)
            assert status == "OK"
        finally:
            c.logout()

    def uids(self, user: str, password: str, folder: str) -> list[bytes]:
        c = self.client(user, password)
        try:
            status, _ = c.select(f'"{folder}"')
            if status != "OK":
                return []
            return list(c.uid("SEARCH", "ALL")[1][0].split())
        finally:
            c.logout()

    def flags(self, user: str, password: str, folder: str) -> list[bytes]:
        c = self.client(user, password)
        try:
            c.select(f'"{folder}"')
            return [line for line in c.fetch("1:*", "(FLAGS)")[1] if line]
        finally:
            c.logout()


def _config(root: Path, port: int, tls_port: int) -> str:
    if os.getuid() == 0:
        mail_user, internal = "mail", ""
    else:
        mail_user = getpass.getuser()
        internal = f"default_internal_user = {mail_user}\ndefault_login_user = {mail_user}\n"
    uid = pwd.getpwnam(mail_user).pw_uid
    dh_file = Path("/usr/share/dovecot/dh.pem")
    dh = f"ssl_dh = <{dh_file}\n" if dh_file.exists() else ""
    return f"""
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
{internal}protocols = imap
listen = 127.0.0.1
ssl = yes
ssl_cert = <{root}/cert.pem
ssl_key = <{root}/key.pem
{dh}disable_plaintext_auth = no
auth_mechanisms = plain login
mail_location = maildir:{root}/mail/%u
mail_uid = {mail_user}
mail_gid = {pwd.getpwnam(mail_user).pw_gid}
first_valid_uid = {min(uid, 1) if uid else 0}
passdb {{
  driver = passwd-file
  args = {root}/passwd
}}
userdb {{
  driver = static
  args = uid={uid} gid={pwd.getpwnam(mail_user).pw_gid} home={root}/mail/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {tls_port}
    ssl = yes
  }}
}}
"""


def _start(root: Path, port: int) -> subprocess.Popen[bytes]:
    binary = shutil.which("dovecot") or "/usr/sbin/dovecot"
    process = subprocess.Popen([binary, "-F", "-c", str(root / "dovecot.conf")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                log = (root / "dovecot.log").read_text() if (root / "dovecot.log").exists() else ""
                raise AssertionError(f"dovecot did not start: {log}") from None
            time.sleep(0.1)


@pytest.fixture(scope="session")
def dovecot() -> Iterator[Dovecot]:
    binary = shutil.which("dovecot") or "/usr/sbin/dovecot"
    assert Path(binary).exists(), "dovecot is needed (Debian package dovecot-imapd)"
    root = Path(tempfile.mkdtemp(prefix="purlgate-dovecot-"))
    root.chmod(0o755)
    (root / "mail").mkdir()
    users = [(f"u{uuid.uuid4().hex[:10]}", uuid.uuid4().hex) for _ in range(64)]
    (root / "passwd").write_text("".join(f"{u}:{{PLAIN}}{p}::::::\n" for u, p in users))
    if os.getuid() == 0:
        shutil.chown(root / "mail", "mail", "mail")
    port, tls_port = free_port(), free_port()
    cert, _ = self_signed(root)
    (root / "dovecot.conf").write_text(_config(root, port, tls_port))
    process = _start(root, port)
    server = Dovecot(root, port, process, users, tls_port, cert)
    yield server
    process = server.process
    process.terminate()
    process.wait(timeout=15)
    shutil.rmtree(root, ignore_errors=True)
