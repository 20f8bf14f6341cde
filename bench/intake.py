"""Benchmark: big messages in parallel, memory and the final dot's answer.

    python bench/intake.py [--sessions 30] [--megabytes 20] [--replies]

A `purlgate serve` subprocess receives S messages of M MB (text, no ZIP: each is
spooled, then answered by a worker with a failure reply) at once over S SMTP sessions.
Printed: the memory (PSS) of the gateway and all its processes together (sampled every 50 ms)
at idle, at its peak until every 250 was said and until every message was answered,
and after, as ratios to idle; the time from the final
dot to the 250, p50/p99, beside the same for one message alone (the baseline, same run).

With ``--replies`` each message is a real data file instead (an AES ZIP of a CSV of
about M MB, values that hardly compress), so each is processed and answered with a
reply of about the same size, taken by a relay sink in this process: the memory is then
that of the whole answer path too (intake, batches, replies through the outbox), until
the last reply has arrived, and 10 s after it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.burst import start_serve, stop_serve, write_config
from bench.smtp import INBOUND, SENDER, free_port
from tests.proc_helpers import pss_mb as pss
from tests.proc_helpers import tree, tree_pss_mb


def rss(pid: int) -> int:
    """MB of memory of ``pid`` and all its processes together: the sum of their PSS."""
    return tree_pss_mb(pid)


def kind(pid: int) -> str:
    """What a process of serve's tree is, from its command line."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return "gone"
    for marker, name in ((b"forkserver import main", "mail forkserver/workers"),
                         (b"resource_tracker", "resource tracker"),
                         (b"spawn_main", "render processes")):
        if marker in command:
            return name
    return "serve"


def by_kind_line(idle: dict[str, int], peak: dict[str, int], after: dict[str, int]) -> str:
    return "  by process, idle / peak / 10 s later MB: " + ", ".join(
        f"{name} {idle.get(name, 0)} / {mb} / {after.get(name, 0)}"
        for name, mb in sorted(peak.items()))


def by_kind(pid: int) -> dict[str, int]:
    """MB of PSS by kind of process (the forkserver counted with its workers)."""
    found: dict[str, int] = {}
    for one in tree(pid):
        found[kind(one)] = found.get(kind(one), 0) + pss(one)
    return found


class Peak:
    """The highest ``rss`` seen, sampled every 50 ms while running, and the highest of
    each kind of process."""

    def __init__(self, pid: int) -> None:
        self.pid, self.value = pid, 0
        self.kinds: dict[str, int] = {}
        self.task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while True:
            kinds = await asyncio.to_thread(by_kind, self.pid)
            self.value = max(self.value, sum(kinds.values()))
            for name, mb in kinds.items():
                self.kinds[name] = max(self.kinds.get(name, 0), mb)
            await asyncio.sleep(0.05)


def data_message(i: int, megabytes: int, password: bytes) -> bytes:
    """An AES ZIP of an acme CSV of about ``megabytes`` MB (random hex: it hardly
    compresses, so the reply's ZIP is about as big), as the demo client mails it."""
    from email.message import EmailMessage
    from email.policy import SMTP as SMTP_POLICY

    from purlgate.core.archive import aes_zip

    row_bytes = 60
    rows = megabytes * 1024 * 1024 // row_bytes
    body = "first_name,email,code\n" + "".join(
        f"N{j},u{j}@acme.example,{os.urandom(16).hex()}\n" for j in range(rows))
    name = f"acme_spring_20261127_1200{i // 60 % 60:02d}_{i % 60:02d}"
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = SENDER, INBOUND, f"big {i}"
    message["Message-ID"] = f"<big-reply-{i}@acme.example>"
    message.set_content("file attached")
    message.add_attachment(aes_zip({f"{name}.csv": body.encode()}, password),
                           maintype="application", subtype="zip", filename=f"{name}.zip")
    return message.as_bytes(policy=SMTP_POLICY).removesuffix(b"\r\n")


def big_message(i: int, megabytes: int) -> bytes:
    line = b"x" * 998 + b"\r\n"
    head = (f"From: {SENDER}\r\nTo: {INBOUND}\r\nSubject: big {i}\r\n"
            f"Message-ID: <big-{i}@acme.example>\r\n\r\n").encode()
    return head + line * (megabytes * 1024 * 1024 // len(line))


async def send_timed(port: int, raw: bytes) -> float:
    """Seconds from the final dot to the server's answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()
    for command in (b"EHLO bench", f"MAIL FROM:<{SENDER}>".encode(),
                    f"RCPT TO:<{INBOUND}>".encode(), b"DATA"):
        writer.write(command + b"\r\n")
        while True:
            line = await reader.readline()
            if line[3:4] == b" ":
                break
    view = memoryview(raw)
    for at in range(0, len(raw), 1 << 20):
        writer.write(view[at : at + (1 << 20)])
        await writer.drain()
    writer.write(b"\r\n.\r\n")
    await writer.drain()
    dot = time.perf_counter()
    answer = await reader.readline()
    took = time.perf_counter() - dot
    assert answer.startswith(b"250"), answer
    writer.write(b"QUIT\r\n")
    await writer.drain()
    writer.close()
    return took


async def run(sessions: int, megabytes: int) -> None:
    smtp_port = free_port()
    with tempfile.TemporaryDirectory() as tmp_name:
        config = write_config(Path(tmp_name), smtp_port, free_port(), 2)
        text = config.read_text().replace("max_message_bytes = 26_214_400",
                                          f"max_message_bytes = {(megabytes + 2) << 20}")
        config.write_text(text)
        child = await start_serve(config, smtp_port)
        try:
            await asyncio.sleep(1.0)
            alone = [await send_timed(smtp_port, big_message(-k, megabytes)) for k in (1, 2)]
            incoming = Path(tmp_name) / "state" / "spool" / "incoming"
            while any(incoming.glob("*.msg")):
                await asyncio.sleep(0.2)
            await asyncio.sleep(2.0)
            idle = rss(child.pid)  # workers started, one message each handled
            messages = [big_message(i, megabytes) for i in range(sessions)]
            peak = Peak(child.pid)
            started = time.perf_counter()
            dots = await asyncio.gather(*(send_timed(smtp_port, m) for m in messages))
            seconds = time.perf_counter() - started
            at_dot = peak.value
            while any(incoming.glob("*.msg")):  # the workers answer every message
                await asyncio.sleep(0.2)
            processed = time.perf_counter() - started
            peak.task.cancel()
            await asyncio.sleep(2.0)
            after = rss(child.pid)
        finally:
            stop_serve(child)
    q = statistics.quantiles(dots, n=100, method="inclusive")
    print(f"machine: {os.cpu_count()} cores; {sessions} sessions x {megabytes} MB at once "
          f"({sessions * megabytes} MB in {seconds:.1f} s)")
    print(f"  memory (PSS) of serve and all its processes: idle {idle} MB; peak while receiving "
          f"{at_dot} MB ({at_dot / idle:.2f}x idle)")
    print(f"  peak until every message was answered ({processed:.1f} s) {peak.value} MB "
          f"({peak.value / idle:.2f}x idle); 2 s later {after} MB ({after / idle:.2f}x idle)")
    print(f"  final dot -> 250: p50 {statistics.median(dots):.3f} s, p99 {q[98]:.3f} s; "
          f"one message alone {min(alone):.3f} s (p99/alone {q[98] / min(alone):.1f}x)")


async def run_replies(sessions: int, megabytes: int) -> None:
    """As ``run``, through the answer path: data files in, replies of their size out."""
    from aiosmtpd.smtp import SMTP
    from bench.burst import Relay

    smtp_port, relay = free_port(), Relay()
    sink = await asyncio.get_running_loop().create_server(
        lambda: SMTP(relay, data_size_limit=(megabytes * 3 + 10) << 20), "127.0.0.1", 0)
    relay_port = sink.sockets[0].getsockname()[1]
    password = (Path(__file__).resolve().parents[1] / "fixtures" / "secrets"
                / "acme-zip-password").read_bytes().strip()
    messages = [data_message(i, megabytes, password) for i in range(sessions + 1)]
    with tempfile.TemporaryDirectory() as tmp_name:
        config = write_config(Path(tmp_name), smtp_port, relay_port, 2)
        config.write_text(config.read_text().replace(
            "max_message_bytes = 26_214_400", f"max_message_bytes = {(megabytes * 2 + 2) << 20}"))
        child = await start_serve(config, smtp_port)
        try:
            await asyncio.sleep(3.0)  # the mail workers prepared
            idle = rss(child.pid)  # before any work
            idle_kinds = by_kind(child.pid)
            await send_timed(smtp_port, messages[0])  # warm up: one answered alone
            while len(relay.arrived) < 1:
                await asyncio.sleep(0.2)
            await asyncio.sleep(2.0)
            warmed = rss(child.pid)
            peak = Peak(child.pid)
            started = time.perf_counter()
            dots = await asyncio.gather(*(send_timed(smtp_port, m) for m in messages[1:]))
            while len(relay.arrived) < sessions + 1:
                await asyncio.sleep(0.2)
            answered = time.perf_counter() - started
            peak.task.cancel()
            await asyncio.sleep(10.0)
            after_kinds = by_kind(child.pid)
            after = sum(after_kinds.values())
            detail = {p: (kind(p), pss(p)) for p in tree(child.pid)}
        finally:
            stop_serve(child)
            sink.close()
    twice = sum(1 for n in relay.count.values() if n > 1)
    print(f"machine: {os.cpu_count()} cores; {sessions} data files of about {megabytes} MB "
          f"(AES ZIPs of CSV) at once, each answered with a reply of its size")
    print(f"  memory (PSS) of serve and all its processes: idle {idle} MB before any work "
          f"(goal < 200), {warmed} MB after one reply; peak until every reply arrived "
          f"({answered:.1f} s) {peak.value} MB ({peak.value / idle:.2f}x idle; goal < 400 MB); "
          f"10 s later {after} MB ({after / idle:.2f}x idle; goal <= 1.2x)")
    print(by_kind_line(idle_kinds, peak.kinds, after_kinds))
    print(f"  10 s later, each: {sorted(detail.values())}")
    print(f"  final dot -> 250: p50 {statistics.median(dots):.3f} s; replies arrived "
          f"{len(relay.arrived)} (twice: {twice})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=30)
    parser.add_argument("--megabytes", type=int, default=20)
    parser.add_argument("--replies", action="store_true",
                        help="data files, processed and answered: the answer path too")
    args = parser.parse_args()
    asyncio.run(run_replies(args.sessions, args.megabytes) if args.replies
                else run(args.sessions, args.megabytes))


if __name__ == "__main__":
    main()
