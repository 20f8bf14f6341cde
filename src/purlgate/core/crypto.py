"""The PGP seam: what the core needs from a key store, and the policy it applies.

The adapter (``purlgate.pgp``) reports facts: the file decrypted or not, which primary
key made a valid signature, whether the signing key was expired or revoked. The core
decides: is a signature required, is it the client's pinned key, what to tell the
client. Messages never echo gpg's own output.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO, Protocol

from purlgate.core.naming import PGP_EXTENSIONS
from purlgate.errors import PgpError

PGP_ARMOR = b"-----BEGIN PGP MESSAGE-----"
CLEARSIGNED = b"-----BEGIN PGP SIGNED MESSAGE-----"
# A message starts with a public-key (1) or symmetric-key (3) encrypted session key.
SESSION_KEY_TAGS = (1, 3)


class SignatureProblem(StrEnum):
    BAD = "bad"  # the signature does not match the data
    EXPIRED_KEY = "expired key"
    REVOKED_KEY = "revoked key"
    UNKNOWN_KEY = "unknown key"  # signed, but not by a key we hold


@dataclass(frozen=True)
class Decrypted:
    signer: str | None  # primary-key fingerprint of a valid signature, upper case
    problem: SignatureProblem | None = None


class Crypto(Protocol):
    def decrypt(self, source: Path, target: Path) -> Decrypted:
        """Decrypt ``source`` into ``target`` (created 0600); PgpError if it cannot."""
        ...

    def encrypt(self, source: Path, out: BinaryIO, *, recipient: str) -> None:
        """Encrypt ``source`` to the key ``recipient`` (a fingerprint), into ``out``."""
        ...

    def check_recipient(self, recipient: str) -> None:
        """PgpEncryptError if ``recipient`` cannot be encrypted to (expired, revoked)."""
        ...


def looks_like_pgp(path: Path, name: str) -> bool:
    """By extension, or by content: an armored message or a binary session-key packet.
    A clearsigned file (signed, not encrypted) is refused outright: processed as text,
    its armor lines would become a PURL file's header."""
    with path.open("rb") as f:
        head = f.read(64)
    if head.lstrip().startswith(CLEARSIGNED):
        raise PgpError(
            "the file is clearsigned (signed but not encrypted), which we do not accept; "
            "encrypt it to our public key (gpg --encrypt --sign), or send the plain file "
            "in a password-protected ZIP"
        )
    if name.lower().endswith(tuple(f".{e}" for e in PGP_EXTENSIONS)):
        return True
    if head.lstrip().startswith(PGP_ARMOR):
        return True
    if not head or not head[0] & 0x80:
        return False
    first = head[0]
    tag = first & 0x3F if first & 0x40 else (first >> 2) & 0x0F
    return tag in SESSION_KEY_TAGS


def check_signature(result: Decrypted, *, pinned: str | None, required: bool) -> None:
    """Refuse unless the data is signed by the client's pinned key (when required)."""
    if not required:
        return
    if pinned is None:
        raise PgpError(
            "this project requires signed files but no signing key is agreed for you; "
            "contact us to set one up"
        )
    shown = spaced_fingerprint(pinned)
    if result.problem is SignatureProblem.EXPIRED_KEY:
        raise PgpError(f"the file is signed with a key that has expired; sign it with your "
                       f"current agreed key (fingerprint {shown})")
    if result.problem is SignatureProblem.REVOKED_KEY:
        raise PgpError(f"the file is signed with a key that was revoked; sign it with your "
                       f"current agreed key (fingerprint {shown})")
    if result.problem is SignatureProblem.BAD:
        raise PgpError("the file's signature does not match its content; it may have been "
                       "changed after signing. Sign and encrypt it again")
    if result.signer is None:
        if result.problem is SignatureProblem.UNKNOWN_KEY:
            raise PgpError(f"the file is signed, but not with your agreed key (fingerprint "
                           f"{shown}); sign it with that key")
        raise PgpError(f"the file is not signed; sign it with your agreed key "
                       f"(fingerprint {shown}) before encrypting it")
    if result.signer.upper() != pinned.upper():
        raise PgpError(f"the file is signed, but not with your agreed key (fingerprint "
                       f"{shown}); sign it with that key")


def spaced_fingerprint(fingerprint: str) -> str:
    """Fingerprints are read by people: groups of four."""
    fp = fingerprint.upper()
    return " ".join(fp[i : i + 4] for i in range(0, len(fp), 4))
