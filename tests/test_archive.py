"""ZIP unwrap: one data file or a specific refusal; bombs stopped by counting bytes."""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import zipfile
from pathlib import Path

import pytest

from purlgate.core.archive import UnwrapLimits, aes_zip, unwrap
from purlgate.core.lifecycle import BatchState
from purlgate.errors import ArchiveError, ArchivePasswordError
from tests.conftest import Harness, scratch_data_left

T = "20261127_101500"
CSV = b"first_name,email\nAda,ada@x.example\n"
LIMITS = UnwrapLimits(max_uncompressed_bytes=4 * 1024 * 1024, max_compression_ratio=100.0,
                      ratio_check_after_bytes=64 * 1024)


def make_zip(entries: dict[str, bytes], *, method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


def make_zipcrypto_zip(tmp: Path, name: str, data: bytes, password: str) -> bytes:
    zip_tool = shutil.which("zip")
    assert zip_tool, "the 'zip' tool is needed (the test bootstrap installs it)"
    src = tmp / "zc"
    src.mkdir(exist_ok=True)
    (src / name).write_bytes(data)
    subprocess.run([zip_tool, "-q", "-P", password, "out.zip", name], cwd=src, check=True)
    return (src / "out.zip").read_bytes()


def run_unwrap(tmp: Path, data: bytes, *, password: bytes | None = None,
               require_aes: bool = False, limits: UnwrapLimits = LIMITS) -> Path:
    path = tmp / f"upload_{T}.zip"
    path.write_bytes(data)
    work = tmp / "work"
    work.mkdir(exist_ok=True)
    result = unwrap(path, path.name, work, password=password, require_aes=require_aes,
                    limits=limits)
    return result.path


def assert_scratch_empty(tmp: Path) -> None:
    assert list((tmp / "work").iterdir()) == [], "a partial extraction was left behind"


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({f"/etc/a_{T}.csv": CSV}, f"the ZIP has an entry with an absolute path ('/etc/a_{T}.csv')"),
        ({f"C:/a_{T}.csv": CSV}, f"the ZIP has an entry with an absolute path ('C:/a_{T}.csv')"),
        ({f"x/../../a_{T}.csv": CSV},
         f"the ZIP has an entry that points outside it ('x/../../a_{T}.csv')"),
        ({f"..\\a_{T}.csv": CSV}, f"the ZIP has an entry that points outside it ('..\\\\a_{T}.csv')"),
        ({"folder/": b"", f"folder/a_{T}.csv": CSV},
         "the ZIP contains a folder (folder/); zip the data file itself, not the folder it is in"),
        ({f"inner_{T}.zip": make_zip({f"a_{T}.csv": CSV})},
         f"the ZIP contains another archive (inner_{T}.zip); put the data file directly in one ZIP"),
        ({"notes.pdf": b"%PDF"},
         "the ZIP contains 'notes.pdf', which is not a data file; it may hold one of: "
         ".csv .tsv .txt .dat"),
        ({}, "the ZIP holds no data file"),
    ],
)
def test_refused_entries(tmp_path: Path, entries: dict[str, bytes], message: str) -> None:
    """Each unsafe or unexpected entry shape has its own message; nothing is extracted."""
    with pytest.raises(ArchiveError) as err:
        run_unwrap(tmp_path, make_zip(entries))
    assert err.value.message == message
    assert_scratch_empty(tmp_path)


def test_nul_in_entry_name(tmp_path: Path) -> None:
    """A NUL byte in a name (zipfile would silently cut it) is refused."""
    data = make_zip({f"a_{T}.csvXtxt": CSV}).replace(b".csvXtxt", b".csv\0txt")
    with pytest.raises(ArchiveError) as err:
        run_unwrap(tmp_path, data)
    assert err.value.message == "the ZIP has an entry whose name contains a NUL byte"


def test_macos_metadata_is_ignored(tmp_path: Path) -> None:
    """Finder's __MACOSX/ resource forks are not a second file."""
    data = make_zip({f"a_{T}.csv": CSV, "__MACOSX/": b"", f"__MACOSX/._a_{T}.csv": b"\0\5"})
    assert run_unwrap(tmp_path, data).read_bytes() == CSV


def test_stored_and_deflated_are_extracted_exactly(tmp_path: Path) -> None:
    """The data file comes out byte for byte, under our own name."""
    for method in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        out = run_unwrap(tmp_path, make_zip({f"../../x/a_{T}.csv".split("/")[-1]: CSV},
                                            method=method))
        assert out.read_bytes() == CSV
        assert out.parent == tmp_path / "work"
        out.unlink()


def test_bomb_by_ratio(tmp_path: Path) -> None:
    """20 MB of zeros in a few KB: stopped as a bomb, the partial copy removed."""
    bomb = make_zip({f"a_{T}.csv": b"a,b\n" + b"0" * (20 * 1024 * 1024)})
    assert len(bomb) < 100_000
    with pytest.raises(ArchiveError) as err:
        run_unwrap(tmp_path, bomb)
    assert err.value.message == "the ZIP expands more than 100 times; it looks like a ZIP bomb"
    assert_scratch_empty(tmp_path)


def test_bomb_by_size(tmp_path: Path) -> None:
    """Over the size limit even at an ordinary ratio: stopped, nothing left."""
    payload = b"a,b\n" + os.urandom(3 * 1024 * 1024).hex().encode()  # ~6 MB, ratio ~2
    limits = UnwrapLimits(4 * 1024 * 1024, 100.0, 64 * 1024)
    with pytest.raises(ArchiveError) as err:
        run_unwrap(tmp_path, make_zip({f"a_{T}.csv": payload}), limits=limits)
    assert err.value.message == (
        "the data file in the ZIP is larger than the limit of 4,194,304 bytes"
    )
    assert_scratch_empty(tmp_path)


def _patch_sizes(data: bytes, *, compressed: int | None = None,
                 uncompressed: int | None = None) -> bytes:
    """Rewrite the sizes in the local and central headers (a lying ZIP)."""
    buf = bytearray(data)
    local = buf.find(b"PK\x03\x04")
    central = buf.find(b"PK\x01\x02")
    if compressed is not None:
        struct.pack_into("<I", buf, local + 18, compressed)
        struct.pack_into("<I", buf, central + 20, compressed)
    if uncompressed is not None:
        struct.pack_into("<I", buf, local + 22, uncompressed)
        struct.pack_into("<I", buf, central + 24, uncompressed)
    return bytes(buf)


def test_bomb_with_a_lying_size_header(tmp_path: Path) -> None:
    """A header claiming 100 bytes does not let 20 MB through: the copy is refused."""
    bomb = _patch_sizes(make_zip({f"a_{T}.csv": b"a,b\n" + b"0" * (20 * 1024 * 1024)}),
                        uncompressed=100)
    with pytest.raises(ArchiveError):
        run_unwrap(tmp_path, bomb)
    assert_scratch_empty(tmp_path)


def test_bomb_with_a_lying_compressed_size(tmp_path: Path) -> None:
    """A compressed size bigger than the archive (to dodge the ratio) is refused as damaged."""
    bomb = _patch_sizes(make_zip({f"a_{T}.csv": b"a,b\n" + b"0" * (2 * 1024 * 1024)}),
                        compressed=1 << 30)
    with pytest.raises(ArchiveError) as err:
        run_unwrap(tmp_path, bomb)
    assert err.value.message == "the ZIP is damaged (an entry is larger than the file)"


def test_not_a_zip(tmp_path: Path) -> None:
    """A .zip that is not one gets a plain answer."""
    with pytest.raises(ArchiveError) as err:
        run_unwrap(tmp_path, b"this is not a zip at all")
    assert err.value.message == "the file is not a readable ZIP archive"


def test_encrypted_without_a_known_password(tmp_path: Path) -> None:
    """An AES ZIP on a channel with no agreed password is refused with what to do."""
    with pytest.raises(ArchivePasswordError) as err:
        run_unwrap(tmp_path, aes_zip({f"a_{T}.csv": CSV}, b"s3cret"))
    assert err.value.message == (
        "the ZIP is password-protected but no password is agreed for this channel; "
        "send the data file without a password here, or use the email channel"
    )


def test_aes_with_the_right_password(tmp_path: Path) -> None:
    """AES-256 with the agreed password opens."""
    out = run_unwrap(tmp_path, aes_zip({f"a_{T}.csv": CSV}, b"s3cret"),
                     password=b"s3cret", require_aes=True)
    assert out.read_bytes() == CSV


def test_wrong_password_echoes_nothing(tmp_path: Path) -> None:
    """A wrong password is refused; the message contains neither password."""
    with pytest.raises(ArchivePasswordError) as err:
        run_unwrap(tmp_path, aes_zip({f"a_{T}.csv": CSV}, b"right-one"),
                   password=b"wrong-one", require_aes=True)
    assert err.value.message == "the password does not open the ZIP; use the agreed password"
    assert "right-one" not in str(err.value) and "wrong-one" not in str(err.value)
    assert_scratch_empty(tmp_path)


def test_zipcrypto_where_aes_is_required(tmp_path: Path) -> None:
    """Legacy ZipCrypto is refused where AES is required, even with the right password."""
    data = make_zipcrypto_zip(tmp_path, f"a_{T}.csv", CSV, "s3cret")
    with pytest.raises(ArchivePasswordError) as err:
        run_unwrap(tmp_path, data, password=b"s3cret", require_aes=True)
    assert err.value.message == (
        "the ZIP uses the old ZipCrypto encryption, which is not safe; protect it with the "
        "agreed password using AES-256 (in 7-Zip: Encryption method AES-256)"
    )


def test_unencrypted_where_aes_is_required(tmp_path: Path) -> None:
    """A plain ZIP on an AES-only channel is refused."""
    with pytest.raises(ArchivePasswordError) as err:
        run_unwrap(tmp_path, make_zip({f"a_{T}.csv": CSV}), password=b"pw", require_aes=True)
    assert err.value.message == (
        "the ZIP is not password-protected; protect it with the agreed password "
        "using AES-256 encryption"
    )


def test_zip_recognised_by_content_whatever_its_name(harness: Harness) -> None:
    """A ZIP named .csv is still unwrapped (its magic bytes say ZIP)."""
    path = harness.write(f"disguised_{T}.csv", make_zip({f"real_{T}.csv": CSV}))
    outcome = harness.run(path)
    assert outcome.state is BatchState.DONE
    assert outcome.batch.data_name == f"real_{T}.csv"


def test_bomb_through_the_pipeline_leaves_nothing(harness_factory) -> None:  # type: ignore[no-untyped-def]
    """Through the whole batch: Failed, no output, no scratch, name not claimed."""
    h = harness_factory(max_ratio=50.0)
    path = h.write(f"bomb_{T}.zip", make_zip({f"a_{T}.csv": b"a,b\n" + b"1,2\n" * 4_000_000}))
    outcome = h.run(path)
    assert outcome.state is BatchState.FAILED
    assert outcome.batch.error_code == "bad-zip"
    assert h.outputs() == []
    assert scratch_data_left(h.tmp / "work") == []
    assert outcome.batch.data_name is None
