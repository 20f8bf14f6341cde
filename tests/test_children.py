"""Nothing is left running after `purlgate serve` dies, however it dies: kill -9 of a
real serve with every kind of child started (the mail workers' forkserver and worker
processes, the render pool's worker, multiprocessing's resource tracker), then a
restart."""

from __future__ import annotations

import os
import signal
import smtplib
import time
from pathlib import Path

from tests.dovecot import free_port
from tests.mail_helpers import INBOUND, SENDER, good_mail, mail_config
from tests.serve_helpers import start
from tests.waiting import eventually_blocking


def descendants(root: int) -> dict[int, str]:
    """The live processes below ``root`` (pid -> command), from /proc."""
    parents: dict[int, int] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue  # a zombie has ended; only its entry waits to be read
        parents[int(entry.name)], commands[int(entry.name)] = int(fields[1]), command
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in found:
                found[child] = commands[child]
                frontier.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    left = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            left.add(pid)
    return left


def test_kill_9_of_serve_leaves_no_process_and_a_restart_works(tmp_path: Path) -> None:
    """Every child of serve ends within 5 s of a kill -9 of serve (a forkserver with its
    workers and the resource tracker used to run on for good, ignoring SIGTERM); serve
    then starts again on the same data folder. Every kind is started first: the mail
    workers' forkserver and its workers, the render process (a batch of a project that
    draws its thumbnails ahead), the resource tracker."""
    cfg = tmp_path / "regions.toml"
    cfg.write_text((mail_config(9) + "\n[regions.usa.web]\nport = 0\n").replace(
        "[clients.acme.projects.spring]\n",
        '[clients.acme.projects.spring]\nrender.pregenerate = ["thumbnail"]\n'))
    data, smtp = tmp_path / "state", free_port()
    proc = start(cfg, data, smtp)
    try:
        assert proc.stdout is not None
        assert "accepting mail" in proc.stdout.readline()
        with smtplib.SMTP("127.0.0.1", smtp) as client:
            client.sendmail(SENDER, [INBOUND], good_mail())

        def started() -> dict[int, str] | None:
            found = descendants(proc.pid)
            kinds = {kind for kind in ("resource_tracker", "forkserver", "spawn_main")
                     if any(kind in c for c in found.values())}
            return found if len(found) >= 5 and len(kinds) == 3 else None

        tree = eventually_blocking(
            started, "the forkserver, two mail workers, a render worker, the resource "
            "tracker", timeout=30)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        killed_at = time.monotonic()
        try:
            eventually_blocking(lambda: not alive(set(tree)), "every child of serve ended",
                                timeout=5)
        except AssertionError:
            left = alive(set(tree))
            raise AssertionError({pid: tree[pid] for pid in left}) from None
        assert time.monotonic() - killed_at < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    again = start(cfg, data, 0)
    try:
        assert again.stdout is not None
        assert "accepting mail" in again.stdout.readline()
    finally:
        again.send_signal(signal.SIGTERM)
        assert again.wait(timeout=30) == 0
        for pipe in (again.stdout, again.stderr):
            if pipe is not None:
                pipe.close()
