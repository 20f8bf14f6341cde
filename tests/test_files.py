"""Scratch folders and spare inodes: nothing of a client's is left behind, and a busy
thread reuses what it let go of instead of making new files (see clear_scratch)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from purlgate.core.files import (
    AtomicFile,
    clear_scratch,
    retire,
    sweep_scratch,
    thread_scratch,
)


def test_a_retired_file_is_emptied_and_its_inode_taken_by_the_next_file(
        tmp_path: Path) -> None:
    scratch = thread_scratch(tmp_path / "work")
    assert scratch.name == f"t{os.getpid()}-{threading.get_ident()}"
    assert scratch.stat().st_mode & 0o777 == 0o700
    out = tmp_path / "out"
    out.mkdir()
    with AtomicFile(out / "PURL_a.csv", mode=0o640) as f:
        f.file.write(b"name,email\nZoe,z@x.example\n")
        first = f.commit()
    inode = first.stat().st_ino
    retire(first, scratch)
    assert not first.exists()
    [spare] = list(scratch.iterdir())
    assert spare.stat().st_size == 0, "no client data is kept"
    seen: list[int] = []

    def elsewhere() -> None:  # another thread has no spares of its own
        with AtomicFile(out / "PURL_other.csv") as g:
            seen.append(os.fstat(g.file.fileno()).st_ino)
            g.file.write(b"x")
            g.commit()

    worker = threading.Thread(target=elsewhere)
    worker.start()
    worker.join()
    assert seen != [inode]
    with AtomicFile(out / "PURL_b.csv", mode=0o640) as f:
        f.file.write(b"name\nAda\n")
        second = f.commit()
    assert second.stat().st_ino == inode, "the inode let go of is taken again"
    assert second.read_bytes() == b"name\nAda\n"
    assert second.stat().st_mode & 0o777 == 0o640
    assert list(scratch.iterdir()) == []


def test_clear_scratch_empties_kept_files_and_removes_the_rest(tmp_path: Path) -> None:
    scratch = thread_scratch(tmp_path)
    (scratch / "unwrapped.csv").write_bytes(b"rows of a client")
    (scratch / "decrypted").write_bytes(b"more rows")
    (scratch / "nested").mkdir()
    (scratch / "nested" / "x").write_bytes(b"x")
    (scratch / "out").mkdir()
    clear_scratch(scratch, lambda name: name in ("unwrapped.csv", "out"))
    assert sorted(p.name for p in scratch.iterdir()) == ["out", "unwrapped.csv"]
    assert (scratch / "unwrapped.csv").stat().st_size == 0


def test_scratch_of_a_process_that_is_gone_is_swept(tmp_path: Path) -> None:
    mine = thread_scratch(tmp_path)
    gone = tmp_path / "t999999999-1"
    gone.mkdir()
    (gone / "attachment").write_bytes(b"a client's ZIP")
    other = tmp_path / "01795811233502018815-34b5e7341432"  # a message's outputs
    other.mkdir()
    sweep_scratch(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, other.name])


def test_a_part_left_as_a_second_name_of_the_published_file_is_never_written_through(
        tmp_path: Path) -> None:
    """A crash between a commit's link() and its unlink() leaves ``.<name>.part`` as a
    second name of the published file. Writing the file again (a restarted batch) must
    not truncate what is published until the new one replaces it, and must not leave
    the .part behind (rename() of two names of one file does nothing)."""
    final = tmp_path / "PURL_a.csv"
    final.write_bytes(b"published\n")
    os.link(final, tmp_path / ".PURL_a.csv.part")
    with AtomicFile(final, no_clobber=False) as f:
        assert final.read_bytes() == b"published\n", "what is published stays as it is"
        f.file.write(b"again\n")
        f.commit()
    assert final.read_bytes() == b"again\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["PURL_a.csv"]


def test_a_file_with_two_names_becomes_one_spare_at_most(tmp_path: Path) -> None:
    """Retiring both names of one file keeps one spare: two later files never share an
    inode (one would empty the other)."""
    scratch = thread_scratch(tmp_path / "work")
    out = tmp_path / "out"
    out.mkdir()
    (out / "PURL_a.csv").write_bytes(b"rows")
    os.link(out / "PURL_a.csv", out / ".PURL_a.csv.part")
    for name in (".PURL_a.csv.part", "PURL_a.csv"):
        retire(out / name, scratch)
    assert list(out.iterdir()) == []
    written = []
    for i in range(3):
        with AtomicFile(out / f"f{i}", mode=0o600) as f:
            f.file.write(f"file {i}".encode())
            written.append(f.commit())
    assert [p.read_bytes() for p in written] == [b"file 0", b"file 1", b"file 2"]
    assert len({p.stat().st_ino for p in written}) == 3
    clear_scratch(scratch, lambda name: False)
