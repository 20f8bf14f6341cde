"""Read the head of a data file: encoding, line ending, header, delimiter, columns.

Pure functions over the first bytes of the file. The encoding decided here is
provisional when it is UTF-8: only the head has been checked, and the streaming
reader confirms the rest (see ``core.table``). Windows-1252 is chosen as soon as the
head is not UTF-8, and its five undefined bytes are an error.
"""

from __future__ import annotations

import codecs
import csv
import io
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from purlgate.errors import DelimiterError, EncodingError, HeaderError, NoDataError

HEAD_BYTES = 256 * 1024
DELIMITERS = (",", ";", "|", "\t")
UTF8_BOM = codecs.BOM_UTF8
CP1252_UNDEFINED = b"\x81\x8d\x8f\x90\x9d"
LINK_COLUMNS = ("thumbnail_1", "landingPage")
SAMPLE_ROWS = 50
# With "keep all columns", more than this share of sampled rows must have the header's
# field count: a few ragged rows (reported as row errors) do not hide the delimiter.
CONSISTENT_SHARE = 0.5

_NAMES = {",": "comma (,)", ";": "semicolon (;)", "|": "pipe (|)", "\t": "tab"}


def delimiter_name(delimiter: str) -> str:
    return _NAMES.get(delimiter, repr(delimiter))


@dataclass(frozen=True)
class ColumnRule:
    name: str
    required: bool


@dataclass(frozen=True)
class Dialect:
    """How the file is written and where its data starts."""

    encoding: str  # "utf-8", "utf-8-sig" (BOM) or "windows-1252"
    delimiter: str
    eol: str
    data_offset: int  # byte offset of the first data row
    header: tuple[str, ...]  # stripped header names, in file order

    @property
    def codec(self) -> str:
        return "cp1252" if self.encoding == "windows-1252" else "utf-8"


@dataclass(frozen=True)
class ColumnPlan:
    """Which header columns go to the PURL file and which must not be empty."""

    output: tuple[int, ...]  # indices into the header, in file order
    required: tuple[int, ...]


def line_of_offset(head: bytes, offset: int) -> int:
    return head.count(b"\n", 0, offset) + 1


def find_undefined_cp1252(chunk: bytes) -> int:
    """Offset of the first byte Windows-1252 does not define, or -1."""
    hits = [i for i in (chunk.find(bytes([b])) for b in CP1252_UNDEFINED) if i >= 0]
    return min(hits) if hits else -1


def undefined_byte_error(byte: int, line: int) -> EncodingError:
    return EncodingError(
        f"line {line} has the byte 0x{byte:02X}, which is neither UTF-8 nor Windows-1252; "
        "save the file as UTF-8 (or Windows-1252) and send it again"
    )


def _decode_head(head: bytes, at_eof: bool, fixed: str | None) -> tuple[str, str, int]:
    """Return (encoding, text, bom_length) for the head of the file."""
    bom = len(UTF8_BOM) if head.startswith(UTF8_BOM) else 0
    body = head[bom:]
    wanted = fixed
    if wanted is None:
        try:
            text = codecs.getincrementaldecoder("utf-8")().decode(body, final=at_eof)
        except UnicodeDecodeError:
            wanted = "windows-1252"
        else:
            return ("utf-8-sig" if bom else "utf-8"), text, bom
    if wanted == "windows-1252":
        bad = find_undefined_cp1252(head)
        if bad >= 0:
            raise undefined_byte_error(head[bad], line_of_offset(head, bad))
        return "windows-1252", head.decode("cp1252"), 0
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(body, final=at_eof)
    except UnicodeDecodeError as exc:
        line = line_of_offset(body, exc.start)
        raise EncodingError(
            f"line {line} is not valid UTF-8, the encoding agreed for this project; "
            "save the file as UTF-8 and send it again"
        ) from exc
    return ("utf-8-sig" if bom else "utf-8"), text, bom


def _header_end(text: str) -> tuple[int, str] | None:
    """Index where the header record ends and its line ending, quotes respected."""
    quoted = False
    for i, ch in enumerate(text):
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch in "\r\n":
            eol = "\r\n" if text.startswith("\r\n", i) else ch
            return i, eol
    return None


def _split(line: str, delimiter: str) -> list[str]:
    return next(csv.reader([line], delimiter=delimiter, strict=False), [])


def _clean(name: str) -> str:
    return name.strip().strip("\ufeff").strip()


def _sample_counts(body: str, delimiter: str, complete: bool) -> list[int]:
    rows = csv.reader(io.StringIO(body, newline=""), delimiter=delimiter)
    try:
        counts = [len(r) for r in itertools.islice(rows, SAMPLE_ROWS + 1) if r]
    except csv.Error:
        return []
    return counts if complete else counts[:-1]


def _choose_delimiter(
    header_line: str, body: str, *, complete: bool, rules: Sequence[ColumnRule],
    candidates: Sequence[str], default: str,
) -> str:
    if len(candidates) == 1:
        return candidates[0]
    splits = {d: [_clean(n) for n in _split(header_line, d)] for d in candidates}
    if rules:
        wanted = {r.name.casefold() for r in rules}
        required = {r.name.casefold() for r in rules if r.required}
        fitting = []
        for d, names in splits.items():
            found = {n.casefold() for n in names} & wanted
            if found and required <= found:
                fitting.append(d)
        if len({tuple(splits[d]) for d in fitting}) == 1:
            # Several delimiters that split the header the same way (one column) agree.
            return default if default in fitting else fitting[0]
        if len(fitting) > 1:
            raise DelimiterError(
                "the header splits into the agreed columns with more than one delimiter ("
                + ", ".join(delimiter_name(d) for d in fitting)
                + "); use one delimiter only"
            )
        # None fits: report missing columns against the split that matched most.
        return max(
            candidates,
            key=lambda d: (len({n.casefold() for n in splits[d]} & wanted), len(splits[d])),
        )
    consistent = []
    for d, names in splits.items():
        if len(names) < 2:
            continue
        counts = _sample_counts(body, d, complete)
        matching = sum(1 for c in counts if c == len(names))
        if not counts or matching > CONSISTENT_SHARE * len(counts):
            consistent.append(d)
    if len(consistent) == 1:
        return consistent[0]
    if len(consistent) > 1:
        raise DelimiterError(
            "cannot tell the delimiter: the header and rows split evenly on "
            + " and ".join(delimiter_name(d) for d in consistent)
            + "; use only one of , ; | or tab between columns"
        )
    if all(len(names) == 1 for names in splits.values()):
        return default  # one column: any delimiter reads it the same way
    raise DelimiterError(
        "cannot tell the delimiter: no one of , ; | or tab gives the same number of "
        "columns in the header and the first rows"
    )


def sniff(
    head: bytes,
    *,
    at_eof: bool,
    rules: Sequence[ColumnRule] = (),
    fixed_encoding: str | None = None,
    fixed_delimiter: str | None = None,
    default_delimiter: str = ",",
) -> Dialect:
    """Work out the dialect from the first ``HEAD_BYTES`` of the file."""
    if not head.strip(b" \t\r\n" + UTF8_BOM):
        raise NoDataError("the file is empty")
    encoding, text, bom = _decode_head(head, at_eof, fixed_encoding)
    end = _header_end(text)
    if end is None:
        if not at_eof:
            raise HeaderError("the header line is longer than 256 KiB; is this a data file?")
        header_line, eol, body = text, "\n", ""
    else:
        index, eol = end
        header_line, body = text[:index], text[index + len(eol):]
    if not body.strip("\r\n"):
        raise NoDataError("the file has a header but no data rows")
    candidates = (fixed_delimiter,) if fixed_delimiter else DELIMITERS
    delimiter = _choose_delimiter(
        header_line, body, complete=at_eof, rules=rules, candidates=candidates,
        default=default_delimiter,
    )
    header = tuple(_clean(n) for n in _split(header_line, delimiter))
    codec = "cp1252" if encoding == "windows-1252" else "utf-8"
    offset = bom + len((header_line + eol).encode(codec))
    return Dialect(encoding, delimiter, eol, offset, header)


def plan_columns(header: Sequence[str], rules: Sequence[ColumnRule], keep_all: bool) -> ColumnPlan:
    """Check the header against the project's agreed columns."""
    seen: dict[str, int] = {}
    for i, name in enumerate(header, start=1):
        if not name:
            raise HeaderError(f"column {i} of the header has no name; name every column")
        key = name.casefold()
        if key in seen:
            raise HeaderError(
                f"the header names {name!r} twice (columns {seen[key]} and {i}); "
                "give every column its own name"
            )
        seen[key] = i
        if key in (c.casefold() for c in LINK_COLUMNS):
            raise HeaderError(
                f"the file already has a {name!r} column, which the PURL file adds; "
                "remove it (was a PURL file sent back?)"
            )
    index = {name.casefold(): i for i, name in enumerate(header)}
    missing = [r.name for r in rules if r.required and r.name.casefold() not in index]
    if missing:
        raise HeaderError(
            f"missing required column(s): {', '.join(missing)}. The header has: "
            + ", ".join(header)
        )
    required = tuple(sorted(index[r.name.casefold()] for r in rules if r.required))
    if keep_all:
        output = tuple(range(len(header)))
    else:
        agreed = (r.name.casefold() for r in rules)
        output = tuple(sorted(index[name] for name in agreed if name in index))
    return ColumnPlan(output=output, required=required)
