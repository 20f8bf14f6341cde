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
