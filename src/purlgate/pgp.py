"""PGP with python-gnupg over the real ``gpg`` binary: the ``Crypto`` port's adapter.

One GNUPGHOME per instance, created 0700. gpg runs in batch mode with loopback
pinentry (python-gnupg adds ``--batch --no-tty --no-verbose``; ``--no-verbose`` keeps
embedded file names out of the status stream, the CVE-2018-12020 attack) and is
killed after a timeout. Output is streamed through ``on_data`` into files we create
0600: decrypted data never sits in memory or in a file others can read.
Keys are pinned: our secret key and each client's public key by fingerprint.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import gnupg

from purlgate.config import PgpConfig
from purlgate.core.crypto import Decrypted, SignatureProblem, spaced_fingerprint
from purlgate.errors import ConfigError, PgpEncryptError, PgpError, ServerError

log = logging.getLogger("purlgate.pgp")
CHUNK = 1 << 20


class _TimedGPG(gnupg.GPG):  # type: ignore[misc]
    """python-gnupg with a deadline: gpg is killed if an operation outlives it."""

    def __init__(self, *, timeout: float, **kwargs: Any) -> None:
        # The base constructor runs gpg once (its version probe); the deadline is for
        # the operations that follow.
        self.timeout: float | None = None
        self.timed_out = False
        super().__init__(**kwargs)
        self.timeout = timeout

    def _collect_output(self, process: Any, result: Any, writer: Any = None,
                        stdin: Any = None) -> Any:
        if self.timeout is None:
            return super()._collect_output(process, result, writer, stdin)
        timer = threading.Timer(self.timeout, self._kill, args=(process,))
        timer.daemon = True
        timer.start()
        try:
            return super()._collect_output(process, result, writer, stdin)
        finally:
            timer.cancel()

    def _handle_io(self, args: Any, fileobj_or_path: Any, result: Any,
                   passphrase: Any = None, binary: bool = False) -> Any:
        try:
            return super()._handle_io(args, fileobj_or_path, result, passphrase, binary)
        except BrokenPipeError:
            # gpg stopped reading its input (it gave up on bad data, or was killed at
            # the deadline); its status lines, already collected, say which.
            return result

    def _kill(self, process: Any) -> None:
        self.timed_out = True
        process.kill()


def _sink(out: BinaryIO) -> Any:
    """An ``on_data`` callback that streams gpg's output to ``out`` and keeps none of it."""

    def on_data(chunk: bytes) -> bool:
        if chunk:
            out.write(chunk)
        return False

    return on_data


def check_passphrase(passphrase: str) -> None:
    """A passphrase goes to gpg through a pipe, ended by a newline: no control characters."""
    if any(ord(c) < 32 or ord(c) == 127 for c in passphrase):
        raise ConfigError("the PGP passphrase contains a newline or another control character")


def ensure_home(home: Path) -> None:
    """Create the GNUPGHOME 0700, or refuse one that others can read."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = stat.S_IMODE(home.stat().st_mode)
    if mode & 0o077:
        if home.stat().st_uid != os.getuid():
            raise ConfigError(f"GNUPGHOME {home} is readable by others and not ours to fix")
        home.chmod(0o700)


SOON_SECONDS = 30 * 86400


def key_health(keys: Sequence[Mapping[str, Any]], owners: Mapping[str, str],
               now: float) -> list[tuple[bool, str]]:
    """(fatal, message) for each pinned key that is revoked, expired or expires within
    30 days: whose key, its fingerprint, and when."""
    report = []
    for key in keys:
        fingerprint = str(key.get("fingerprint", "")).upper()
        owner = owners.get(fingerprint)
        if owner is None:
            continue
        shown = spaced_fingerprint(fingerprint)
        expires = int(key["expires"]) if str(key.get("expires") or "").isdigit() else None
        when = (datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%d")
                if expires is not None else "")
        if key.get("trust") == "r":
            report.append((True, f"{owner} ({shown}) is revoked: replace it"))
        elif key.get("trust") == "e" or (expires is not None and expires <= now):
            report.append((True, f"{owner} ({shown}) expired on {when}: replace or extend it"))
        elif expires is not None and expires - now < SOON_SECONDS:
            days = int((expires - now) // 86400)
            report.append((False, f"{owner} ({shown}) expires on {when}, in {days} day(s): "
                                  "extend it before then"))
    return report


class GpgKeyStore:
    """Our key pair and the clients' public keys, in one GNUPGHOME."""

    def __init__(self, home: Path, *, fingerprint: str, passphrase: str | None,
                 sign: bool, timeout: float) -> None:
        self.home = home
        self.fingerprint = fingerprint.upper()
        self._passphrase = passphrase
        self._sign = sign
        self._timeout = timeout
        # (fatal, message) per key that is expired, revoked or expires soon.
        self.key_report: list[tuple[bool, str]] = []

    @classmethod
    def open(cls, config: PgpConfig, data_dir: Path,
             client_keys: Mapping[str, tuple[Path, str]]) -> GpgKeyStore:
        """Set up the keyring: import and pin our key and each client's key."""
        home = config.home or data_dir / "gnupg"
        ensure_home(home)
        passphrase = None
        if config.passphrase is not None:
            passphrase = config.passphrase.reveal().decode("utf-8")
            check_passphrase(passphrase)
        store = cls(home, fingerprint=config.fingerprint, passphrase=passphrase,
                    sign=config.sign_output, timeout=config.timeout_seconds)
        try:
            store._import_keys(config, client_keys)
        except BaseException:
            store.close()  # gpg started an agent for this home; do not leave it running
            raise
        return store

    def _import_keys(self, config: PgpConfig,
                     client_keys: Mapping[str, tuple[Path, str]]) -> None:
        """Import and pin our secret key and each client's public key."""
        gpg = self._gpg()
        if config.private_key is not None:
            imported = gpg.import_keys(config.private_key.reveal(), passphrase=self._passphrase)
            if self.fingerprint not in {f.upper() for f in imported.fingerprints}:
                raise ConfigError(
                    "the region's PGP private_key does not hold the key with fingerprint "
                    f"{self.fingerprint}"
                )
        secret = {k["fingerprint"].upper() for k in gpg.list_keys(secret=True)}
        if self.fingerprint not in secret:
            raise ConfigError(f"no secret key {self.fingerprint} in GNUPGHOME {self.home}")
        for client_id, (key_file, pinned) in client_keys.items():
            try:
                data = key_file.read_bytes()
            except OSError as exc:
                raise ConfigError(f"client {client_id}: cannot read pgp_public_key "
                                  f"{key_file}: {exc.strerror}") from exc
            result = gpg.import_keys(data)
            found = {f.upper() for f in result.fingerprints}
            if found != {pinned.upper()}:
                raise ConfigError(
                    f"client {client_id}: pgp_public_key {key_file} must hold exactly the key "
                    f"{pinned.upper()} (it holds {', '.join(sorted(found)) or 'no key'})"
                )
        owners = {self.fingerprint: "the region's own PGP key",
                  **{pinned.upper(): f"client {cid}'s PGP key"
                     for cid, (_, pinned) in client_keys.items()}}
        self.key_report = key_health(gpg.list_keys(), owners, time.time())
        for fatal, message in self.key_report:
            (log.error if fatal else log.warning)("%s", message)

    def _gpg(self) -> _TimedGPG:
        try:
            return _TimedGPG(timeout=self._timeout, gnupghome=str(self.home))
        except (OSError, ValueError) as exc:
            raise ServerError("the gpg program is not available") from exc

    def close(self) -> None:
        """Stop the gpg-agent this keyring started."""
        gpgconf = shutil.which("gpgconf")
        if gpgconf:
            subprocess.run(  # noqa: S603 - fixed program, our own home path
                [gpgconf, "--homedir", str(self.home), "--kill", "gpg-agent"],
                check=False, capture_output=True, timeout=30,
            )

    def decrypt(self, source: Path, target: Path) -> Decrypted:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        ok = False
        try:
            with os.fdopen(fd, "wb") as out:
                gpg = self._gpg()
                gpg.on_data = _sink(out)
                gpg.buffer_size = CHUNK
                result = gpg.decrypt_file(str(source), passphrase=self._passphrase,
                                          always_trust=True)
            if gpg.timed_out:
                raise ServerError(f"decrypting took longer than {self._timeout:g} s")
            if getattr(result, "on_data_failure", None) is not None:
                raise ServerError("could not write the decrypted data")
            if not result.ok:
                log.info("decrypt refused: %s", result.status)
                if result.status == "no secret key":
                    raise PgpError(
                        "the file is not encrypted to our key; encrypt it to the public key "
                        f"we gave you (fingerprint {spaced_fingerprint(self.fingerprint)})"
                    )
                raise PgpError(
                    "the file could not be decrypted: it is damaged or not an OpenPGP "
                    "message. Encrypt it again with the public key we gave you"
                )
            ok = True
            return _signature_facts(result)
        finally:
            if not ok:
                target.unlink(missing_ok=True)

    def encrypt(self, source: Path, out: BinaryIO, *, recipient: str) -> None:
        gpg = self._gpg()
        gpg.on_data = _sink(out)
        gpg.buffer_size = CHUNK
        result = gpg.encrypt_file(
            str(source), [recipient], armor=False, always_trust=True,
            sign=self.fingerprint if self._sign else None,
            passphrase=self._passphrase if self._sign else None,
        )
        if gpg.timed_out:
            raise ServerError(f"encrypting took longer than {self._timeout:g} s")
        if getattr(result, "on_data_failure", None) is not None:
            raise ServerError("could not write the encrypted result")
        if not result.ok:
            log.error("encrypt to %s failed: %s", recipient, result.status)
            raise PgpEncryptError(f"encrypting to {recipient} failed: {result.status}")

    def check_recipient(self, recipient: str) -> None:
        """Before a batch runs: refuse a recipient key that is expired or revoked."""
        problems = key_health(self._gpg().list_keys(keys=[recipient]),
                              {recipient.upper(): "the client's key"}, time.time())
        fatal = [message for is_fatal, message in problems if is_fatal]
        if fatal:
            raise PgpEncryptError(fatal[0])


def _signature_facts(result: Any) -> Decrypted:
    """What the signature says. ``status`` ends as "decryption ok" whatever happened to
    the signature, so problems are read from the list python-gnupg keeps of them."""
    problems = {str(p.get("status")) for p in result.problems}
    if "signing key has expired" in problems:
        return Decrypted(None, SignatureProblem.EXPIRED_KEY)
    if "signing key was revoked" in problems:
        return Decrypted(None, SignatureProblem.REVOKED_KEY)
    if "signature bad" in problems:
        return Decrypted(None, SignatureProblem.BAD)
    if result.valid and result.pubkey_fingerprint:
        return Decrypted(signer=str(result.pubkey_fingerprint).upper())
    if problems & {"no public key", "signature error"}:
        return Decrypted(None, SignatureProblem.UNKNOWN_KEY)
    return Decrypted(None)

