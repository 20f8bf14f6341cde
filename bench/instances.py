"""Benchmark: several instances of a region on PostgreSQL, against one on SQLite.

    python bench/instances.py [--messages 500] [--batches 300] [--lease 30]

Four figures, each beside its baseline from the same command:

1. per batch: the batch core alone (``BatchProcessor.process`` on a 20-row file, in
   this process), its store on SQLite in data_dir, then on PostgreSQL;
2. per message: a burst of twenty-row emails over 20 SMTP sessions answered end to end
   by one ``purlgate serve``, on SQLite, then on PostgreSQL;
3. the same burst spread over two instances of the region (one database, one shared
   data_dir) against one instance on PostgreSQL: on this 2-core machine the point is
   that every reply arrives exactly once, not speed;
4. takeover: two instances, a 300,000-row file's batch running on one when it is
   killed (SIGKILL); the seconds from the kill to its reply sent by the other, with
   ``--lease`` seconds of lease (the default's, 30).

PostgreSQL is Debian's, a throwaway cluster in a temporary folder (as the tests start
it), with fsync on: its commits are as durable as SQLite's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.burst import Relay, calibrate, message, session, start_serve, write_config
from bench.smtp import INBOUND, ROOT, SENDER, free_port
from tests.pg_helpers import PgCluster

DATABASE = '\n[regions.usa.database]\nurl = {{ env = "PURLGATE_DATABASE_URL" }}\n' \
           "lease_seconds = {lease}\n"


def region_config(tmp: Path, smtp: int, relay: int, database: bool, lease: float) -> Path:
    path = write_config(tmp, smtp, relay, 2)
    if database:
        text = path.read_text()
        at = text.index("\n[regions.eur]")
        path.write_text(text[:at] + DATABASE.format(lease=lease) + text[at:])
    return path


async def start(config: Path, smtp: int, instance: str, env: dict[str, str],
                data_dir: Path) -> subprocess.Popen[bytes]:
    return await start_serve(config, smtp, "--smtp-port", str(smtp), "--instance", instance,
                             "--data-dir", str(data_dir), env=env)


def stop(child: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if child.poll() is None:
        os.killpg(child.pid, sig)
    child.wait(timeout=60)


async def burst(messages: int, instances: int, url: str | None) -> dict[str, float]:
    """``messages`` emails over 20 sessions spread over ``instances`` serve processes
    (``url``: on that database, else SQLite); end-to-end rate and reply latencies."""
    import aiosmtplib
    from aiosmtpd.smtp import SMTP

    password = (ROOT / "fixtures" / "secrets" / "acme-zip-password").read_bytes().strip()
    mails = [message(i, password) for i in range(messages)]
    warmup = [message(messages + i, password) for i in range(20)]
    relay = Relay()
    relay_port = free_port()
    ports = [free_port() for _ in range(instances)]
    server = await asyncio.get_running_loop().create_server(lambda: SMTP(relay),
                                                            "127.0.0.1", relay_port)
    env = {"PURLGATE_DATABASE_URL": url} if url else {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        config = region_config(tmp, ports[0], relay_port, url is not None, 30)
        children = [await start(config, port, f"bench-{n}", env, tmp / "state")
                    for n, port in enumerate(ports)]
        try:
            await asyncio.gather(*(aiosmtplib.send(
                raw, sender=SENDER, recipients=[INBOUND], hostname="127.0.0.1",
                port=ports[k % instances], start_tls=False) for k, (_, raw) in
                enumerate(warmup)))
            while any(msgid not in relay.arrived for msgid, _ in warmup):
                await asyncio.sleep(0.01)
            accepted: dict[str, float] = {}
            start_at = time.perf_counter()

            await asyncio.gather(*(session(ports[k % instances], mails[k::20], accepted)
                                   for k in range(20)))
            deadline = time.perf_counter() + 600
            while len(relay.arrived) < messages + 20 and time.perf_counter() < deadline:
                await asyncio.sleep(0.01)
            end = max(relay.arrived.values())
            await asyncio.sleep(1.0)  # anything sent twice would arrive now
        finally:
            for child in children:
                stop(child)
            server.close()
    missing = [m for m, _ in mails if m not in relay.arrived]
    twice = [m for m, n in relay.count.items() if n > 1]
    assert not missing and not twice, f"{len(missing)} replies missing, {len(twice)} twice"
    latencies = [relay.arrived[m] - accepted[m] for m, _ in mails]
    return {"e2e": messages / (end - start_at), "p50": statistics.median(latencies),
            "p99": statistics.quantiles(latencies, n=100, method="inclusive")[98]}


def per_batch(batches: int, url: str | None) -> float:
    """Batches per second of the core alone on 20-row files, store on ``url`` or SQLite."""
    from purlgate.config import parse_config
    from purlgate.core.pipeline import Submission
    from purlgate.region import build_region

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        config = region_config(tmp, free_port(), free_port(), url is not None, 30)
        if url:
            os.environ["PURLGATE_DATABASE_URL"] = url
        region = build_region(parse_config(config.read_text(), source=str(config)), "usa",
                              data_dir=tmp / "state")
        body = "first_name,email\n" + "".join(f"Zoë{i},u{i}@acme.example\n"
                                              for i in range(20))
        out = tmp / "out"
        out.mkdir()
        files = []
        for n in range(batches):
            source = tmp / f"acme_spring_20261127_{101500 + n // 100:06d}_{n % 100:02d}.csv"
            source.write_text(body)
            files.append(source)
        start_at = time.perf_counter()
        for source in files:
            outcome = region.processor.process(
                Submission(path=source, received_name=source.name, channel="bench",
                           client_id="acme"), out)
            assert outcome.batch.state.value == "Done", outcome.batch
        seconds = time.perf_counter() - start_at
        region.close()
    return batches / seconds


async def takeover(url: str, lease: float) -> float:
    """Seconds from the kill of the instance running a big batch to its reply."""
    import aiosmtplib
    import psycopg
    from aiosmtpd.smtp import SMTP
    from bench.burst import OTHER

    from purlgate.core.archive import aes_zip

    password = (ROOT / "fixtures" / "secrets" / "acme-zip-password").read_bytes().strip()
    relay = Relay()
    relay_port = free_port()
    ports = [free_port(), free_port()]
    server = await asyncio.get_running_loop().create_server(
        lambda: SMTP(relay, data_size_limit=None), "127.0.0.1", relay_port)
    body = "".join(f"Name{i},u{i}@beta.example,{i % 97}\n" for i in range(300_000))
    name = "beta_big_20261127_120000"
    zipped = aes_zip({f"{name}.csv": ("first_name,email,score\n" + body).encode()}, password)
    from email.message import EmailMessage
    from email.policy import SMTP as SMTP_POLICY

    big = EmailMessage()
    big["From"], big["To"], big["Subject"] = OTHER, INBOUND, "big"
    big["Message-ID"] = "<big-file@beta.example>"
    big.set_content("big file")
    big.add_attachment(zipped, maintype="application", subtype="zip", filename=f"{name}.zip")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        config = region_config(tmp, ports[0], relay_port, True, lease)
        env = {"PURLGATE_DATABASE_URL": url}
        children = {f"bench-{n}": await start(config, port, f"bench-{n}", env, tmp / "state")
                    for n, port in enumerate(ports)}
        try:
            await aiosmtplib.send(big.as_bytes(policy=SMTP_POLICY), sender=OTHER,
                                  recipients=[INBOUND], hostname="127.0.0.1", port=ports[0],
                                  start_tls=False, timeout=300)
            runner = None
            while runner is None:
                with psycopg.connect(url) as conn:
                    row = conn.execute("SELECT state, instance FROM batches WHERE"
                                       " data_name = %s", (f"{name}.csv",)).fetchone()
                runner = row[1] if row and row[0] == "In Progress" else None
                await asyncio.sleep(0.01)
            stop(children[runner], signal.SIGKILL)
            killed = time.perf_counter()
            deadline = killed + 600
            while "<big-file@beta.example>" not in relay.arrived:
                assert time.perf_counter() < deadline, "never taken over"
                await asyncio.sleep(0.01)
            return relay.arrived["<big-file@beta.example>"] - killed
        finally:
            for child in children.values():
                stop(child)
            server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--lease", type=float, default=30.0)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores; calibration loop {calibrate():.1f} ms")
    pg = PgCluster(durable=True)
    try:
        urls = [pg.url(pg.new_database()) for _ in range(5)]
        sqlite_b, pg_b = per_batch(args.batches, None), per_batch(args.batches, urls[0])
        print(f"1. the core alone, {args.batches} twenty-row batches one after another:")
        print(f"   batches/s   SQLite {sqlite_b:8.1f}   PostgreSQL {pg_b:8.1f}   "
              f"ratio {pg_b / sqlite_b:5.2f}")
        one_sqlite = asyncio.run(burst(args.messages, 1, None))
        one_pg = asyncio.run(burst(args.messages, 1, urls[1]))
        two_pg = asyncio.run(burst(args.messages, 2, urls[2]))
        print(f"2./3. {args.messages} twenty-row emails over 20 SMTP sessions, each reply "
              "checked to arrive exactly once:")
        print(f"   {'':22}{'1 on SQLite':>14}{'1 on PG':>14}{'2 on PG':>14}"
              f"{'PG/SQLite':>11}{'2/1':>7}")
        for label, key in (("end to end (msg/s)", "e2e"), ("reply p50 (s)", "p50"),
                           ("reply p99 (s)", "p99")):
            print(f"   {label:<22}{one_sqlite[key]:>14.2f}{one_pg[key]:>14.2f}"
                  f"{two_pg[key]:>14.2f}{one_pg[key] / one_sqlite[key]:>11.2f}"
                  f"{two_pg[key] / one_pg[key]:>7.2f}")
        seconds = asyncio.run(takeover(urls[3], args.lease))
        print(f"4. takeover: the instance running a 300,000-row batch killed; its reply "
              f"sent by the other {seconds:.1f} s later (lease {args.lease:g} s)")
    finally:
        pg.close()


if __name__ == "__main__":
    main()
