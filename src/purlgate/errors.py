"""One exception tree for purlgate, split by whose fault it is.

    PurlgateError
    ├── ClientInputError            the client's file or message is wrong; tell the client
    │   ├── FileNameError           no exact time of day, unknown project in the name
    │   ├── FileTypeError           not one of .csv .tsv .txt .dat (.zip)
    │   ├── DuplicateFileError      this name was already received for the project
    │   ├── ArchiveError            a ZIP we refuse (paths, folders, nesting, size, ratio)
    │   │   └── ArchivePasswordError   encrypted without a known password, wrong password,
    │   │                              or ZipCrypto where AES is required
    │   ├── PgpError                cannot decrypt, or the signature is not the agreed one
    │   ├── MessageError            an email without exactly one ZIP attachment
    │   ├── EncodingError           bytes that are neither UTF-8 nor Windows-1252
    │   ├── DelimiterError          no delimiter, or more than one, fits the header
    │   ├── HeaderError             missing required columns, duplicate or empty names
    │   ├── NoDataError             empty file, header only, or no valid row at all
    │   └── CutOffError             the file ends mid-row: a transfer stopped early
    ├── ConfigError                 regions.toml is wrong; nothing starts
    └── ServerError                 our side or a backend failed; retry, alert ops
        ├── SpoolFullError          the spool's disk is full or below its floor (SMTP 452)
        ├── StorageError            disk full, fsync/rename failed, state store broken
        ├── DamagedEntryError       a spool entry's own files are unreadable (no retry)
        ├── PgpEncryptError         the client's key cannot be encrypted to (alert ops)
        └── RenderError             the render backend failed for the whole batch
            └── RenderAuthError     the render API refused our credentials (alert ops)

Signals between our own parts, never shown to a client as they are:

    DeliveryError                   the relay did not take a message (outbox)
    ├── TemporaryDeliveryError      4xx, timeout, refused connection: retried
    └── PermanentDeliveryError      5xx: moved to outbox/failed, operator alerted
    RenderBusyError                 more first views wait than the render queue holds (503)
    └── RenderTimeoutError          a render ran past its time limit (503, worker replaced)
    InvalidUtf8Error                a file whose head was UTF-8 is not, further on: read
                                    it again as Windows-1252
    TransitionError                 a programming error: a move the lifecycle table forbids

Each ClientInputError carries ``code`` (a stable slug for logs, tests and channel
mappings), ``message`` (plain words the client can act on; never row data, never
library internals) and the SMTP reply a channel would give if it could still refuse.
A ServerError's ``message`` is for operators; what a client is told of it is its
``client_reason`` (None: the generic internal-error sentence).
"""

from __future__ import annotations

import errno
import sqlite3

STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})


class PurlgateError(Exception):
    """Base of every error purlgate raises on purpose."""

    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ClientInputError(PurlgateError):
    """The client's input is wrong; the message tells the client what to fix."""

    code = "bad-input"
    smtp_code = 550
    smtp_status = "5.6.0"


class FileNameError(ClientInputError):
    code = "bad-file-name"


class FileTypeError(ClientInputError):
    code = "bad-file-type"


class DuplicateFileError(ClientInputError):
    code = "duplicate-name"
    smtp_status = "5.7.0"


class ArchiveError(ClientInputError):
    code = "bad-zip"


class ArchivePasswordError(ArchiveError):
    code = "zip-password"
    smtp_status = "5.7.5"


class MessageError(ClientInputError):
    code = "bad-message"


class PgpError(ClientInputError):
    code = "pgp"
    smtp_status = "5.7.5"


class EncodingError(ClientInputError):
    code = "bad-encoding"


class DelimiterError(ClientInputError):
    code = "bad-delimiter"


class HeaderError(ClientInputError):
    code = "bad-header"


class NoDataError(ClientInputError):
    code = "no-data"


class CutOffError(ClientInputError):
    code = "cut-off"


class ConfigError(PurlgateError):
    """regions.toml (or a secret it points at) is unusable."""

    code = "bad-config"


class ServerError(PurlgateError):
    """Our side failed; the client did nothing wrong and the work can be retried."""

    code = "server-error"
    smtp_code = 451
    smtp_status = "4.3.0"
    client_reason: str | None = None


class SpoolFullError(ServerError):
    code = "spool-full"
    smtp_code = 452
    smtp_status = "4.3.1"


class StorageError(ServerError):
    code = "storage"


class DatabaseUnavailableError(StorageError):
    """The region's database cannot be reached (or refused us): work waits for it, as
    for a full disk, and goes on by itself once it is back."""

    code = "database"


class DamagedEntryError(ServerError):
    code = "damaged-entry"


class PgpEncryptError(ServerError):
    code = "pgp-encrypt"
    client_reason = (
        "we could not encrypt your results to your PGP key on file (it may have expired or "
        "been revoked), so none were delivered; our operators have been alerted and will "
        "contact you about a renewed key"
    )


class RenderError(ServerError):
    code = "render"


class RenderAuthError(RenderError):
    code = "render-auth"
    client_reason = (
        "our video rendering service refused our credentials, so no video was made; "
        "this is on our side and our operators have been alerted"
    )


class DeliveryError(Exception):
    """The relay did not take a message."""


class TemporaryDeliveryError(DeliveryError):
    pass


class PermanentDeliveryError(DeliveryError):
    pass


class RenderBusyError(Exception):
    """More first views are waiting than the configured queue allows."""


class RenderTimeoutError(RenderBusyError):
    """A render ran past its time limit; its worker was replaced."""


class InvalidUtf8Error(Exception):
    """The head looked like UTF-8 but a later block is not; read again as Windows-1252."""


class TransitionError(Exception):
    """A programming error: the pipeline asked for a move the table does not allow."""


def is_storage_fault(exc: BaseException) -> bool:
    """A full or failing disk, however a library reports it (also as a cause): work that
    met one waits for the disk and goes on, it is not failed."""
    seen: BaseException | None = exc
    looked: set[int] = set()
    while seen is not None and id(seen) not in looked:
        looked.add(id(seen))
        if isinstance(seen, StorageError):
            return True
        if isinstance(seen, OSError) and seen.errno in STORAGE_ERRNOS:
            return True
        if isinstance(seen, sqlite3.OperationalError) and any(
                words in str(seen) for words in ("disk is full", "disk I/O error")):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
