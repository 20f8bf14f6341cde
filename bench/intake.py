"""Benchmark: big messages in parallel, memory and the final dot's answer.

    python bench/intake.py [--sessions 30] [--megabytes 20]

A `purlgate serve` subprocess receives S messages of M MB (text, no ZIP: each is
spooled, then answered by a worker with a failure reply) at once over S SMTP sessions.
Printed: the process's RSS at idle, its peak (VmHWM) once every 250 was said and once
every message was answered, and RSS after, as ratios to idle; the time from the final
dot to the 250, p50/p99, beside the same for one message alone (the baseline, same run).
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


def rss(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) // 1024  # MB
    return fields


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
            idle = rss(child.pid)["VmRSS"]
            alone = [await send_timed(smtp_port, big_message(-k, megabytes)) for k in (1, 2)]
            before = rss(child.pid)["VmRSS"]
            messages = [big_message(i, megabytes) for i in range(sessions)]
            started = time.perf_counter()
            dots = await asyncio.gather(*(send_timed(smtp_port, m) for m in messages))
            seconds = time.perf_counter() - started
            at_dot = rss(child.pid)["VmHWM"]
            incoming = Path(tmp_name) / "state" / "spool" / "incoming"
            while any(incoming.glob("*.msg")):  # the workers answer every message
                await asyncio.sleep(0.2)
            processed = time.perf_counter() - started
            peak = rss(child.pid)["VmHWM"]
            await asyncio.sleep(2.0)
            after = rss(child.pid)["VmRSS"]
        finally:
            stop_serve(child)
    q = statistics.quantiles(dots, n=100, method="inclusive")
    print(f"machine: {os.cpu_count()} cores; {sessions} sessions x {megabytes} MB at once "
          f"({sessions * megabytes} MB in {seconds:.1f} s)")
    print(f"  RSS idle {idle} MB; before the burst {before} MB; peak while receiving "
          f"{at_dot} MB ({at_dot / idle:.2f}x idle)")
    print(f"  peak until every message was answered ({processed:.1f} s) {peak} MB "
          f"({peak / idle:.2f}x idle); 2 s later {after} MB ({after / idle:.2f}x idle)")
    print(f"  final dot -> 250: p50 {statistics.median(dots):.3f} s, p99 {q[98]:.3f} s; "
          f"one message alone {min(alone):.3f} s (p99/alone {q[98] / min(alone):.1f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=30)
    parser.add_argument("--megabytes", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(run(args.sessions, args.megabytes))


if __name__ == "__main__":
    main()
