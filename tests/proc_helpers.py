"""A process tree's memory as the machine counts it: PSS (shared pages split between the
processes that map them) summed over a process and everything below it (the mail
workers are the children of their forkserver, itself a child of serve)."""

from __future__ import annotations

from pathlib import Path


def tree(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    found = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return found
    for child in children:
        found += tree(int(child))
    return found


def pss_mb(pid: int) -> int:
    """One process's PSS in MB (0 once it is gone)."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return sum(int(line.split()[1]) for line in rollup.splitlines()
               if line.startswith("Pss:")) // 1024


def tree_pss_mb(root: int) -> int:
    """PSS of ``root`` and every process below it, in MB."""
    return sum(pss_mb(pid) for pid in tree(root))
