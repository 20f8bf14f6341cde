"""Benchmark: the memory of a running `purlgate serve` while it takes and processes one
big SFTP upload.

    python bench/sftp_batch.py [--rows 10000000]

A real `purlgate serve` (the bundled configuration: SMTP, SFTP, web, two mail worker
processes) takes a CSV of ``--rows`` rows (bench/core.py's data, about 120 bytes a row)
uploaded with the OpenSSH sftp client, processes it (SFTP batches run in serve) and puts
the PURL file in the client's Downloads. Printed: PSS summed over serve's whole process
tree (sampled every 50 ms) idle before the upload, its peak until the PURL file is
there (goal for 10M rows: under 400 MB), 10 s after, and each kind of process's peak;
the upload and processing times.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.burst import start_serve, stop_serve, write_config
from bench.core import generate
from bench.intake import Peak, by_kind, by_kind_line
from bench.sftp import NAME, client_key, upload
from bench.smtp import free_port


async def run(rows: int) -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = tmp / NAME
        started = time.perf_counter()
        generate(data, rows)
        made, size = time.perf_counter() - started, data.stat().st_size
        key = client_key(tmp)
        smtp_port, sftp_port = free_port(), free_port()
        config = write_config(tmp, smtp_port, free_port(), 2)
        text = config.read_text().replace("[regions.usa.sftp]\nhost = \"127.0.0.1\"\nport = 0\n",
                                          f"[regions.usa.sftp]\nhost = \"127.0.0.1\"\n"
                                          f"port = {sftp_port}\n", 1)
        pubkey = key.with_suffix(".pub").read_text().strip()
        text = text.replace("authorized_keys = []", f'authorized_keys = ["{pubkey}"]', 1)
        config.write_text(text)
        child = await start_serve(config, smtp_port)
        try:
            await asyncio.sleep(3.0)  # the mail workers prepared
            idle = by_kind(child.pid)
            peak = Peak(child.pid)
            began = time.perf_counter()
            uploaded = await asyncio.to_thread(upload, sftp_port, "acme", key, data,
                                               f"/Uploads/{NAME}")
            downloads = tmp / "state" / "sftp" / "acme" / "Downloads"
            while not any(p.name.startswith("PURL_") for p in downloads.glob("*")):
                await asyncio.sleep(0.2)
            processed = time.perf_counter() - began
            peak.task.cancel()
            await asyncio.sleep(10.0)
            after = by_kind(child.pid)
        finally:
            stop_serve(child)
    total = sum(idle.values())
    print(f"machine: the bundled configuration; {rows:,} rows ({size / 1e9:.2f} GB, made in "
          f"{made:.0f} s) uploaded with OpenSSH sftp in {uploaded:.1f} s, PURL file in "
          f"Downloads {processed:.1f} s after the upload began")
    print(f"  memory (PSS) of serve and all its processes: idle {total} MB; peak "
          f"{peak.value} MB (goal < 400); 10 s later {sum(after.values())} MB")
    print(by_kind_line(idle, peak.kinds, after))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    args = parser.parse_args()
    asyncio.run(run(args.rows))


if __name__ == "__main__":
    main()
