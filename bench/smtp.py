"""Benchmark: the SMTP listener's acceptance rate and the reply latency.

    python bench/smtp.py [--messages 2000] [--sessions 20] [--emails 50]

1. Acceptance: Postfix's smtp-source (20 concurrent sessions) sends N messages to
   purlgate's listener (sender and From checks, spool with fsync, rename and folder
   fsync, 250) and, in the same run, to a bare aiosmtpd whose handler only writes and
   fsyncs each message: this library's floor. Both do their disk work on a 32-thread
   pool. Each server runs in its own child process with no worker behind it, so only
   acceptance is measured; rounds alternate and medians are compared.
2. Latency: a full instance (listener, worker, outbox) with the embedded renderer; 50
   emails with a 20-row AES ZIP are sent one after another, timing from the start of
   each SMTP transaction to its reply reaching the relay (an SMTP sink here). p50, p99.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from email import policy
from email.message import EmailMessage
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SENDER = "data-team@acme.example"
INBOUND = "sftp-usa@idomoo.com"
SMTP_SOURCE = "/usr/sbin/smtp-source"


def config_text(smtp_port: int, relay_port: int) -> str:
    """The bundled configuration on these ports. Every benchmark session comes from
    127.0.0.1: the per-address cap (10) is lifted, or the 11th session gets a 421."""
    text = (ROOT / "src" / "purlgate" / "regions.toml").read_text()
    text = text.replace("[regions.usa.smtp]\n",
                        "[regions.usa.smtp]\nmax_connections_per_ip = 100\n", 1)
    text = text.replace("port = 2525\n", f"port = {smtp_port}\n")
    text = text.replace("port = 2526\n", f"port = {relay_port}\n")
    text = text.replace("port = 2222\n", "port = 0\n")
    return text.replace('{ file = "fixtures/secrets/', f'{{ file = "{ROOT}/fixtures/secrets/')


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- child servers ------------------------------------------------------------------


async def child_bare(port: int, spool: Path) -> None:
    from aiosmtpd.smtp import SMTP

    spool.mkdir(parents=True, exist_ok=True)

    from concurrent.futures import ThreadPoolExecutor

    # Same thread count as purlgate's spool pool: the floor gets the same concurrency.
    POOL = ThreadPoolExecutor(max_workers=32)  # noqa: N806

    class WriteAndSync:
        async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802
            def write() -> None:
                path = spool / uuid.uuid4().hex
                with path.open("xb") as f:
                    f.write(envelope.original_content)
                    f.flush()
                    os.fsync(f.fileno())

            await asyncio.get_running_loop().run_in_executor(POOL, write)
            return "250 OK"

    loop = asyncio.get_running_loop()
    await loop.create_server(lambda: SMTP(WriteAndSync(), data_size_limit=26_214_400),
                             "127.0.0.1", port)
    print("ready", flush=True)
    await asyncio.Event().wait()


async def child_purlgate(port: int, data_dir: Path) -> None:
    from purlgate.app import build_gateway
    from purlgate.channels.smtp_listener import start_smtp
    from purlgate.config import parse_config

    gateway = build_gateway(parse_config(config_text(port, free_port())), "usa",
                            data_dir=data_dir)
    await start_smtp(gateway.handler, gateway.region.config.smtp)
    print("ready", flush=True)
    await asyncio.Event().wait()


def measure_acceptance(kind: str, messages: int, sessions: int, tmp: Path) -> float:
    port = free_port()
    child = subprocess.Popen([sys.executable, __file__, "--child", kind, str(port),
                              str(tmp)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        start = time.perf_counter()
        subprocess.run([SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-l", "2000",
                        "-f", SENDER, "-t", INBOUND, f"127.0.0.1:{port}"], check=True,
                       capture_output=True, timeout=600)
        seconds = time.perf_counter() - start
    finally:
        child.terminate()
        child.wait(timeout=30)
        if child.stdout is not None:
            child.stdout.close()
    accepted = len(list(tmp.rglob("*.msg"))) if kind == "purlgate" else \
        len(list(tmp.iterdir()))
    assert accepted == messages, f"{kind}: {accepted} of {messages} accepted"
    return messages / seconds


# -- latency ----------------------------------------------------------------------------


def email(i: int, password: bytes) -> bytes:
    from purlgate.core.archive import aes_zip

    stamp = f"20261127_{10 + i // 3600:02d}{(i // 60) % 60:02d}{i % 60:02d}"
    name = f"acme_spring_{stamp}_00"
    rows = "first_name,email\n" + "".join(f"Zoë{j},u{j}@acme.example\n" for j in range(20))
    zipped = aes_zip({f"{name}.csv": rows.encode()}, password)
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = SENDER, INBOUND, f"bench {i}"
    msg["Message-ID"] = f"<bench-{i}-{uuid.uuid4().hex}@acme.example>"
    msg.set_content("file attached")
    msg.add_attachment(zipped, maintype="application", subtype="zip",
                       filename=f"{name}.zip")
    return msg.as_bytes(policy=policy.SMTP)


async def measure_latency(count: int, tmp: Path) -> list[float]:
    import aiosmtplib
    from aiosmtpd.smtp import SMTP

    from purlgate.app import build_gateway, serve
    from purlgate.config import parse_config

    arrived: dict[str, float] = {}

    class Relay:
        async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802
            for line in (envelope.original_content or b"").split(b"\r\n"):
                if line.lower().startswith(b"in-reply-to:"):
                    arrived[line.split(b":", 1)[1].strip().decode()] = time.perf_counter()
            return "250 OK"

    relay_port, smtp_port = free_port(), free_port()
    loop = asyncio.get_running_loop()
    relay = await loop.create_server(lambda: SMTP(Relay()), "127.0.0.1", relay_port)
    gateway = build_gateway(parse_config(config_text(smtp_port, relay_port)), "usa",
                            data_dir=tmp / "latency")
    stop = asyncio.Event()
    task = asyncio.create_task(serve(gateway, stop))
    while gateway.smtp is None:
        await asyncio.sleep(0.05)
    password = (ROOT / "fixtures" / "secrets" / "acme-zip-password").read_bytes().strip()
    latencies = []
    for i in range(count):
        raw = email(i, password)
        msgid = raw.split(b"Message-ID: ")[1].split(b"\r\n")[0].decode()
        start = time.perf_counter()
        await aiosmtplib.send(raw, sender=SENDER, recipients=[INBOUND], hostname="127.0.0.1",
                              port=smtp_port, start_tls=False)
        while msgid not in arrived:
            await asyncio.sleep(0.002)
        latencies.append(arrived[msgid] - start)
    stop.set()
    await task
    relay.close()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--emails", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, port, folder = args.child
        runner = child_bare if kind == "bare" else child_purlgate
        asyncio.run(runner(int(port), Path(folder)))
        return
    if not Path(SMTP_SOURCE).exists():
        sys.exit("smtp-source is needed: apt-get install postfix (only its client is used)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rates: dict[str, list[float]] = {"bare": [], "purlgate": []}
        for i in range(args.rounds):  # alternate, so disk weather hits both sides
            for kind in ("bare", "purlgate"):
                rates[kind].append(measure_acceptance(kind, args.messages, args.sessions,
                                                      root / f"{kind}-{i}"))
        bare, ours = statistics.median(rates["bare"]), statistics.median(rates["purlgate"])
        print(f"acceptance, {args.messages} messages over {args.sessions} sessions "
              f"(smtp-source, 2 kB bodies, fsync per message), median of {args.rounds}:")
        print(f"  bare aiosmtpd (write + fsync) {bare:8.0f} msg/s  "
              f"{[round(r) for r in rates['bare']]}")
        print(f"  purlgate listener             {ours:8.0f} msg/s  "
              f"{[round(r) for r in rates['purlgate']]}")
        print(f"  ratio purlgate/bare           {ours / bare:8.2f}  (target >= 0.8)")
        lat = asyncio.run(measure_latency(args.emails, root))
        q = statistics.quantiles(lat, n=100, method="inclusive")
        print(f"reply latency over {len(lat)} emails of 20 rows (final dot -> reply at relay):")
        print(f"  p50 {statistics.median(lat) * 1000:7.1f} ms   p99 {q[98] * 1000:7.1f} ms   "
              f"max {max(lat) * 1000:7.1f} ms  (target p50 < 1 s)")


if __name__ == "__main__":
    main()
