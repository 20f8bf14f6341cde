"""Unwrap a received file into exactly one data file.

A ZIP (by extension or by its magic bytes) must hold exactly one data file at its top
level. Every entry name is checked before anything is read; the data is copied out
under a name of ours (never a path taken from the archive) while counting the bytes
actually produced, so a lying header cannot smuggle a bomb past the limits.

Also the one home of making an AES ZIP (replies, the QA tools) and of reading a small
one whole (a reply's, a fixture's).
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from purlgate.core.files import private_file
from purlgate.core.naming import ARCHIVE_EXTENSIONS, DATA_EXTENSIONS, split_extension
from purlgate.errors import ArchiveError, ArchivePasswordError

ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
CHUNK = 1 << 20
# Other archive formats inside a ZIP are as unwelcome as a ZIP inside a ZIP.
NESTED_ARCHIVES = (*ARCHIVE_EXTENSIONS, "7z", "rar", "gz", "tgz", "bz2", "xz", "tar", "jar")
# Finder adds resource forks under __MACOSX/; they are metadata, not a second file.
MACOS_METADATA = "__MACOSX"


@dataclass(frozen=True)
class UnwrapLimits:
    max_uncompressed_bytes: int
    max_compression_ratio: float
    ratio_check_after_bytes: int


@dataclass(frozen=True)
class Unwrapped:
    path: Path  # the data file to parse (the input itself when it was not an archive)
    data_name: str  # the data file's own name (inside the ZIP, or as received)
    from_archive: bool


def is_zip(path: Path, received_name: str) -> bool:
    if split_extension(received_name)[1].lower() in ARCHIVE_EXTENSIONS:
        return True
    with path.open("rb") as f:
        return f.read(4) in ZIP_MAGIC


def needs_password(path: Path, received_name: str) -> bool:
    """True for a ZIP with an encrypted entry (read from its directory, nothing extracted)."""
    if not is_zip(path, received_name):
        return False
    import pyzipper  # noqa: PLC0415 (only ZIPs need it; a plain file starts faster)

    try:
        with pyzipper.AESZipFile(path) as zf:
            return any(info.flag_bits & 0x1 for info in zf.infolist())
    except (pyzipper.BadZipFile, EOFError, ValueError, OSError):
        return False  # unwrap reports what is wrong with it


def _check_entry_name(raw: str) -> PurePosixPath:
    """Refuse names that point anywhere but one file at the top level."""
    if "\0" in raw:
        raise ArchiveError("the ZIP has an entry whose name contains a NUL byte")
    name = raw.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise ArchiveError(f"the ZIP has an entry with an absolute path ({raw!r})")
    path = PurePosixPath(name)
    if ".." in path.parts:
        raise ArchiveError(f"the ZIP has an entry that points outside it ({raw!r})")
    return path


def _entries(zf: Any) -> list[Any]:
    """Check every entry and return the data files among them."""
    data: list[Any] = []
    for info in zf.infolist():
        path = _check_entry_name(info.orig_filename)
        if path.parts and path.parts[0] == MACOS_METADATA:
            continue
        if info.is_dir() or len(path.parts) > 1:
            folder = path.parts[0] if len(path.parts) > 1 else path.name
            raise ArchiveError(
                f"the ZIP contains a folder ({folder}/); zip the data file itself, "
                "not the folder it is in"
            )
        ext = split_extension(path.name)[1].lower()
        if ext in NESTED_ARCHIVES:
            raise ArchiveError(
                f"the ZIP contains another archive ({path.name}); put the data file "
                "directly in one ZIP"
            )
        if ext not in DATA_EXTENSIONS:
            allowed = " ".join(f".{e}" for e in DATA_EXTENSIONS)
            raise ArchiveError(
                f"the ZIP contains {path.name!r}, which is not a data file; "
                f"it may hold one of: {allowed}"
            )
        data.append(info)
    if not data:
        raise ArchiveError("the ZIP holds no data file")
    if len(data) > 1:
        names = ", ".join(i.filename for i in data[:5])
        raise ArchiveError(
            f"the ZIP holds {len(data)} data files ({names}); send one data file per ZIP"
        )
    return data


def _check_encryption(info: Any, password: bytes | None, require_aes: bool) -> None:
    encrypted = bool(info.flag_bits & 0x1)
    aes = getattr(info, "wz_aes_strength", None) is not None
    if require_aes and not encrypted:
        raise ArchivePasswordError(
            "the ZIP is not password-protected; protect it with the agreed password "
            "using AES-256 encryption"
        )
    if require_aes and not aes:
        raise ArchivePasswordError(
            "the ZIP uses the old ZipCrypto encryption, which is not safe; protect it "
            "with the agreed password using AES-256 (in 7-Zip: Encryption method AES-256)"
        )
    if encrypted and password is None:
        raise ArchivePasswordError(
            "the ZIP is password-protected but no password is agreed for this channel; "
            "send the data file without a password here, or use the email channel"
        )


def _copy_limited(
    source: Any, target: Path, compressed_size: int, limits: UnwrapLimits
) -> None:
    written = 0
    with private_file(target) as out:
        while chunk := source.read(CHUNK):
            written += len(chunk)
            if written > limits.max_uncompressed_bytes:
                raise ArchiveError(
                    "the data file in the ZIP is larger than the limit of "
                    f"{limits.max_uncompressed_bytes:,} bytes"
                )
            if (
                written > limits.ratio_check_after_bytes
                and written > compressed_size * limits.max_compression_ratio
            ):
                raise ArchiveError(
                    "the ZIP expands more than "
                    f"{limits.max_compression_ratio:g} times; it looks like a ZIP bomb"
                )
            out.write(chunk)


def unwrap(
    path: Path,
    received_name: str,
    work_dir: Path,
    *,
    password: bytes | None,
    require_aes: bool,
    limits: UnwrapLimits,
) -> Unwrapped:
    """Return the one data file in ``path``; a plain data file is returned as it is."""
    if not is_zip(path, received_name):
        return Unwrapped(path=path, data_name=received_name, from_archive=False)
    import pyzipper  # noqa: PLC0415 (only ZIPs need it; a plain file starts faster)

    archive_size = path.stat().st_size
    try:
        zf = pyzipper.AESZipFile(path)
    except (pyzipper.BadZipFile, EOFError, ValueError) as exc:
        raise ArchiveError("the file is not a readable ZIP archive") from exc
    with zf:
        (info,) = _entries(zf)
        _check_encryption(info, password, require_aes)
        if info.compress_size > archive_size:
            raise ArchiveError("the ZIP is damaged (an entry is larger than the file)")
        if password is not None:
            zf.setpassword(password)
        target = work_dir / f"unwrapped.{split_extension(info.filename)[1].lower()}"
        try:
            with zf.open(info) as member:
                _copy_limited(member, target, info.compress_size, limits)
        except RuntimeError as exc:
            target.unlink(missing_ok=True)
            if "password" in str(exc).lower():
                raise ArchivePasswordError(
                    "the password does not open the ZIP; use the agreed password"
                ) from exc
            raise ArchiveError("the ZIP could not be opened") from exc
        except (pyzipper.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
            target.unlink(missing_ok=True)
            raise ArchiveError(
                "the ZIP is damaged or uses an unsupported compression method"
            ) from exc
        except BaseException:
            target.unlink(missing_ok=True)
            raise
    return Unwrapped(
        path=target, data_name=PurePosixPath(info.filename).name, from_archive=True
    )


# -- making and reading ZIPs whole (replies, the QA tools, the tests) ---------------


def aes_zip(members: Sequence[Path] | Mapping[str, bytes], password: bytes | None,
            target: Path | BinaryIO | None = None) -> bytes:
    """A ZIP of ``members`` (files on disk, read as it goes and stored under their own
    names, or name -> bytes), WinZip AES-256 encrypted with ``password`` (7-Zip, WinZip,
    Keka and The Unarchiver open it), or plain without one. Written into ``target`` (a
    path or file; returns b"") or, without one, returned."""
    import pyzipper  # noqa: PLC0415 (only ZIPs need it; a plain file starts faster)

    buf = target if target is not None else io.BytesIO()
    options = {"encryption": pyzipper.WZ_AES} if password is not None else {}
    with pyzipper.AESZipFile(buf, "w", compression=pyzipper.ZIP_DEFLATED, **options) as zf:
        if password is not None:
            zf.setpassword(password)
            zf.setencryption(pyzipper.WZ_AES, nbits=256)
        if isinstance(members, Mapping):
            for name, data in members.items():
                zf.writestr(name, data)
        else:
            for path in members:
                zf.write(path, arcname=path.name)
    return buf.getvalue() if isinstance(buf, io.BytesIO) else b""


@dataclass(frozen=True)
class ZipContents:
    members: dict[str, bytes]  # every entry, by its name in the ZIP, in order
    encrypted: bool  # some entry is password-protected
    aes: bool  # every encrypted entry uses WinZip AES (not ZipCrypto)


def read_zip(data: bytes | Path, password: bytes | None = None) -> ZipContents:
    """Every entry of a small ZIP, read whole (what a reply or a fixture holds; a
    client's data file goes through ``unwrap``). ArchivePasswordError when it is
    encrypted and ``password`` is missing or wrong; ArchiveError when it is no ZIP."""
    import pyzipper  # noqa: PLC0415 (only ZIPs need it; a plain file starts faster)

    source = io.BytesIO(data) if isinstance(data, bytes) else data
    try:
        with pyzipper.AESZipFile(source) as zf:
            infos = zf.infolist()
            encrypted = [i for i in infos if i.flag_bits & 0x1]
            aes = all(getattr(i, "wz_aes_strength", None) is not None for i in encrypted)
            if encrypted and password is None:
                raise ArchivePasswordError("the ZIP is password-protected")
            if password is not None:
                zf.setpassword(password)
            members = {i.filename: zf.read(i.filename) for i in infos}
    except RuntimeError as exc:
        raise ArchivePasswordError("the password does not open the ZIP") from exc
    except (pyzipper.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError) as exc:
        raise ArchiveError("the file is not a readable ZIP archive") from exc
    return ZipContents(members, bool(encrypted), aes)
