"""File names: the guide's naming rule, project selection, and the names we write.

Pure functions only. The rule: ``<client>_<project>_YYYYMMdd_HHMMss_mm.<ext>`` is
recommended and selects the client and project when they exist; any other name must
contain an exact time of day (YYYYMMdd and HHMMss).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from purlgate.errors import FileNameError, FileTypeError

if TYPE_CHECKING:
    from purlgate.config import ClientConfig

DATA_EXTENSIONS = ("csv", "tsv", "txt", "dat")
ARCHIVE_EXTENSIONS = ("zip",)
PGP_EXTENSIONS = ("pgp", "gpg", "asc")  # .asc: gpg -a's and Kleopatra's default name
RECOMMENDED_FORM = "<client>_<project>_YYYYMMdd_HHMMss_mm.<ext>"
MAX_NAME_LENGTH = 180

_RECOMMENDED = re.compile(
    r"^(?P<client>[A-Za-z0-9][A-Za-z0-9-]*)_(?P<project>[A-Za-z0-9][A-Za-z0-9-]*)_"
    r"(?P<date>\d{8})_(?P<time>\d{6})(?:_\d{2})?$"
)
# A date and a time of day, optionally separated; not part of a longer run of digits.
_TIME_OF_DAY = re.compile(r"(?<!\d)(\d{8})[-_T. ]?(\d{6})(?!\d)")


@dataclass(frozen=True)
class DataName:
    """A data file name that passed the naming rule."""

    name: str
    stem: str
    extension: str  # as written by the client, without the dot ("" only inside PGP)
    timestamp: datetime
    client_part: str | None  # from the recommended form only
    project_part: str | None


def split_extension(name: str) -> tuple[str, str]:
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        return name, ""
    return stem, ext


def check_safe_name(name: str) -> None:
    """Refuse names that cannot be written safely as one file in one folder."""
    if not name or name in {".", ".."}:
        raise FileNameError("the file has no name")
    if len(name) > MAX_NAME_LENGTH:
        raise FileNameError(f"the file name is longer than {MAX_NAME_LENGTH} characters")
    if any(c in name for c in "/\\") or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise FileNameError("the file name contains a path separator or a control character")
    if name.startswith("."):
        raise FileNameError("the file name starts with a dot (a hidden file)")


def _valid_timestamp(date: str, time: str) -> datetime | None:
    try:
        return datetime.strptime(date + time, "%Y%m%d%H%M%S")  # noqa: DTZ007 - a name, not a clock
    except ValueError:
        return None


def strip_pgp(name: str) -> tuple[str, bool]:
    """``x.csv.pgp`` -> (``x.csv``, True); other names are returned as they are."""
    stem, ext = split_extension(name)
    if ext.lower() in PGP_EXTENSIONS:
        return stem, True
    return name, False


def parse_data_name(name: str, *, from_pgp: bool = False) -> DataName:
    """Apply the naming rule; the error shows the recommended form.

    Inside PGP the name may lack an extension (the guide's ``data_file.pgp``): the
    decrypted content is then read as delimited text.
    """
    check_safe_name(name)
    stem, ext = split_extension(name)
    if from_pgp and not ext:
        stem, ext = name, ""
    elif ext.lower() not in DATA_EXTENSIONS:
        allowed = " ".join(
            f".{e}" for e in (*DATA_EXTENSIONS, *ARCHIVE_EXTENSIONS, *PGP_EXTENSIONS)
        )
        shown = f".{ext}" if ext else "no extension"
        raise FileTypeError(
            f"{name!r} is not a data file ({shown}); send one of: {allowed} "
            "(a .zip holding exactly one data file; .pgp/.gpg for encrypted files)"
        )
    match = _RECOMMENDED.match(stem)
    if match:
        stamp = _valid_timestamp(match["date"], match["time"])
        if stamp is not None:
            return DataName(name, stem, ext, stamp, match["client"], match["project"])
    for found in _TIME_OF_DAY.finditer(stem):
        stamp = _valid_timestamp(found[1], found[2])
        if stamp is not None:
            return DataName(name, stem, ext, stamp, None, None)
    raise FileNameError(
        f"{name!r} does not contain an exact time of day; name the file like "
        f"{RECOMMENDED_FORM}, for example acme_spring_20261127_101500_00.csv"
    )


def purl_name(data: DataName, prefix: str, suffix: str, *, encrypted: bool = False) -> str:
    """``<Prefix><ORIGINAL_FILE_NAME><Suffix>.<ORIGINAL_FILE_EXTENSION>``.

    Encrypted output adds ``.gpg``: ``data_file.pgp`` -> ``PURL_data_file.gpg``,
    ``x.csv.pgp`` -> ``PURL_x.csv.gpg`` (which gpg decrypts to ``PURL_x.csv``).
    """
    base = f"{prefix}{data.stem}{suffix}"
    if encrypted:
        return f"{base}.{data.extension}.gpg" if data.extension else f"{base}.gpg"
    return f"{base}.{data.extension or 'csv'}"


def flag_name(purl: str) -> str:
    return f"{purl}.flg"


def error_name(data: DataName, prefix: str, suffix: str, *, encrypted: bool = False) -> str:
    return _errors_of(data.stem, prefix, suffix, encrypted=encrypted)


def error_name_of_received(received: str, prefix: str, suffix: str, *,
                           encrypted: bool = False) -> str:
    """The error file of a file as received, whose name may not pass the rule (a ZIP or
    PGP file refused before its data file was seen): named after its stem."""
    stem = split_extension(strip_pgp(received)[0])[0]
    return _errors_of(stem, prefix, suffix, encrypted=encrypted)


def _errors_of(stem: str, prefix: str, suffix: str, *, encrypted: bool) -> str:
    name = f"{prefix}{stem}{suffix}_errors.csv"
    return f"{name}.gpg" if encrypted else name


def client_from_name(name: str, clients: Iterable[str]) -> str | None:
    """The client a file name starts with (``<client>_...``, any case), or None."""
    head = split_extension(name)[0].split("_", 1)[0].casefold()
    return next((cid for cid in clients if cid.casefold() == head), None)


def select_project(clients: Mapping[str, ClientConfig], client_id: str, wanted: str | None,
                   data: DataName) -> str:
    """The project a file is for: the one its name names, else the channel's, else the
    client's only one; a name naming another project or client is refused, not guessed."""
    client = clients[client_id]
    if wanted is not None and wanted not in client.projects:
        raise FileNameError(f"client {client_id} has no project {wanted!r}")
    named_client, named_project = data.client_part, data.project_part
    if named_client is not None and named_project is not None:
        if named_client.casefold() == client_id.casefold():
            by_name = {p.casefold(): p for p in client.projects}
            project = by_name.get(named_project.casefold())
            if project is None:
                raise FileNameError(
                    f"the file name names project {named_project!r}, which client "
                    f"{client_id} does not have; projects: {', '.join(client.projects)}"
                )
            if wanted is not None and wanted != project:
                raise FileNameError(
                    f"the file name names project {project!r} but it was sent for "
                    f"project {wanted!r}; rename it or send it to the right place"
                )
            return project
        if named_client.casefold() in (c.casefold() for c in clients):
            raise FileNameError(
                f"the file name names client {named_client!r}, but it came from "
                f"client {client_id}"
            )
    if wanted is not None:
        return wanted
    if len(client.projects) == 1:
        return next(iter(client.projects))
    raise FileNameError(
        f"cannot tell the project of {data.name!r}; name the file "
        f"{client_id}_<project>_YYYYMMdd_HHMMss_mm.{data.extension} with one of: "
        + ", ".join(client.projects)
    )
