"""Benchmark: what the links serve, beside nginx serving the same JPEG, in one run.

    python bench/render.py [--seconds 10] [--connections 50] [--lookup-rows 10000000]

1. A real `purlgate serve` (child process, one event loop, plain HTTP) with a 1,000-row
   batch; nginx (Debian's nginx-light, one worker) serves a copy of one rendered
   thumbnail from disk. wrk (50 connections, one thread) against nginx's JPEG, our
   cached thumbnail and our landing page: requests/s and p99, and the ratios to nginx
   (goal: at least 0.3x; landing page p99 under 50 ms).
2. Thumbnails drawn per second on first views (200 distinct rows at once), landing
   pages made per second on first views (500 distinct rows), and the time to a
   first-view video (4 s, 1280x720 H.264), median of 5 distinct rows.
3. Row lookups in a 10M-row row store: p50 and p99 of 10,000 random ordinals (goal:
   p99 under 5 ms).
The 1M-row core with and without the row store is `python bench/core.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

NAME = "acme_spring_20261127_101500_00.csv"
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def config(tmp: Path, web: int, workers: int) -> Path:
    path = tmp / f"regions-{workers}.toml"
    path.write_text(textwrap.dedent(f"""
        [regions.usa]
        inbound_addresses = ["sftp-usa@idomoo.com"]
        data_dir = "{tmp / 'usa'}"
        public_base_url = "https://purl.bench"
        [regions.usa.smtp]
        port = 0
        [regions.usa.relay]
        port = 9
        [regions.usa.web]
        port = {web}
        render_workers = {workers}
        render_queue = 1000
        [clients.acme]
        name = "Acme"
        regions = ["usa"]
        [clients.acme.projects.spring]
        """))
    return path


def make_batch(tmp: Path, cfg: Path, rows: int) -> list[tuple[str, str]]:
    """Process a file with `purlgate process`; (thumbnail path, page path) per row."""
    src = tmp / NAME
    lines = ["first_name,email,city"] + [f"Zoë{i},u{i}@acme.example,Paris" for i in range(rows)]
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    exe = str(Path(sys.executable).with_name("purlgate"))
    subprocess.run([exe, "process", str(src), "--config", str(cfg), "--client", "acme",
                    "--out", str(tmp / "out")], check=True, capture_output=True)
    out = (tmp / "out" / f"PURL_{NAME}").read_text(encoding="utf-8").splitlines()[1:]
    links = []
    for line in out:
        thumb, page = line.split(",")[-2:]
        links.append((thumb.removeprefix("https://purl.bench"),
                      page.removeprefix("https://purl.bench")))
    return links


def serve(cfg: Path) -> subprocess.Popen[bytes]:
    exe = str(Path(sys.executable).with_name("purlgate"))
    return subprocess.Popen([exe, "serve", "--region", "usa", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wrk(url: str, seconds: int, connections: int) -> tuple[float, float]:
    """requests/s and p99 latency (ms) of one wrk run."""
    result = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
                             url], check=True, capture_output=True, text=True)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", result.stdout).group(1))  # type: ignore[union-attr]
    value, unit = re.search(r"99%\s+([\d.]+)(us|ms|s)", result.stdout).groups()  # type: ignore[union-attr]
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    if "Non-2xx" in result.stdout:
        raise RuntimeError(f"errors from {url}:\n{result.stdout}")
    return rps, float(value) * scale


def nginx(tmp: Path, jpeg: Path, port: int) -> subprocess.Popen[bytes]:
    root = tmp / "nginx"
    (root / "html" / "t").mkdir(parents=True)
    shutil.copy(jpeg, root / "html" / "t" / "thumb.jpg")
    conf = root / "nginx.conf"
    # As root, nginx's worker would drop to an account that cannot read the temp folder.
    user = "user root;" if os.geteuid() == 0 else ""
    conf.write_text(textwrap.dedent(f"""
        {user}
        worker_processes 1;
        daemon off;
        pid {root}/nginx.pid;
        error_log {root}/error.log;
        events {{ worker_connections 1024; }}
        http {{
            access_log off;
            sendfile on;
            client_body_temp_path {root}/tmp;
            proxy_temp_path {root}/tmp;
            fastcgi_temp_path {root}/tmp;
            uwsgi_temp_path {root}/tmp;
            scgi_temp_path {root}/tmp;
            types {{ image/jpeg jpg; }}
            server {{
                listen 127.0.0.1:{port};
                root {root}/html;
                add_header Cache-Control "public, max-age=2592000, immutable";
            }}
        }}
        """))
    return subprocess.Popen(["nginx", "-c", str(conf), "-p", str(root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def first_views(base: str, paths: list[str]) -> float:
    """Seconds until every path answered 200 (all asked at once)."""
    import aiohttp

    start = time.perf_counter()
    async with aiohttp.ClientSession() as http:
        async def one(path: str) -> None:
            async with http.get(base + path) as resp:
                await resp.read()
                assert resp.status == 200, resp.status
        await asyncio.gather(*(one(p) for p in paths))
    return time.perf_counter() - start


def lookup_bench(tmp: Path, rows: int) -> tuple[float, float, float]:
    """Build a row store of ``rows`` rows; (p50 ms, p99 ms, build seconds)."""
    import pyarrow as pa

    from purlgate.rowstore import ArrowRowStore

    store = ArrowRowStore(tmp / "lookup", key=bytes(range(32)))
    writer = store.writer(1, ["first_name", "email", "city"])
    start = time.perf_counter()
    block = 100_000
    names = pa.array([f"Zoë{i}" for i in range(block)])
    mails = pa.array([f"user{i}@acme.example" for i in range(block)])
    cities = pa.array(["Paris, FR"] * block)
    for at in range(0, rows, block):
        n = min(block, rows - at)
        writer.write(at, {"first_name": names[:n], "email": mails[:n], "city": cities[:n]}, n)
    writer.finish()
    writer.commit()
    built = time.perf_counter() - start
    rng = random.Random(7)
    samples = []
    for _ in range(10_000):
        ordinal = rng.randrange(rows)
        t = time.perf_counter()
        row = store.lookup(1, ordinal)
        samples.append((time.perf_counter() - t) * 1000)
        assert row is not None and row["first_name"] == f"Zoë{ordinal % block}"
    samples.sort()
    store.close()
    return samples[len(samples) // 2], samples[int(len(samples) * 0.99)], built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--lookup-rows", type=int, default=10_000_000)
    args = parser.parse_args()
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            sys.exit(f"{tool} is needed: scripts/dev bench render installs it")
    print(f"machine: {os.cpu_count()} cores; wrk -t1 -c{args.connections} "
          f"-d{args.seconds}s; nginx 1 worker; purlgate 1 process")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        web = free_port()
        cfg = config(tmp, web, workers=1)
        links = make_batch(tmp, cfg, 1000)
        proc = serve(cfg)
        ngx = None
        try:
            wait_port(web)
            base = f"http://127.0.0.1:{web}"
            time.sleep(1.0)  # the render pool's workers start and import what they need
            # 2. first views
            seconds = asyncio.run(first_views(base, [t for t, _ in links[:200]]))
            thumbs_per_s = 200 / seconds
            pages_per_s = 500 / asyncio.run(first_views(base, [p for _, p in links[300:800]]))
            video_times = []
            for _, page in links[200:205]:
                video_times.append(asyncio.run(first_views(
                    base, [page.replace("/p/", "/v/") + ".mp4"])))
            # 1. cached media under load, beside nginx
            thumb, page = links[0]
            jpeg = next((tmp / "usa" / "renders").rglob("*.jpg"))
            nport = free_port()
            ngx = nginx(tmp, jpeg, nport)
            wait_port(nport)
            n_rps, n_p99 = wrk(f"http://127.0.0.1:{nport}/t/thumb.jpg", args.seconds,
                               args.connections)
            t_rps, t_p99 = wrk(base + thumb, args.seconds, args.connections)
            p_rps, p_p99 = wrk(base + page, args.seconds, args.connections)
        finally:
            proc.terminate()
            proc.wait(30)
            if ngx is not None:
                ngx.terminate()
                ngx.wait(30)
        print("cached media under wrk:")
        print(f"  nginx, the JPEG from disk       {n_rps:9,.0f} req/s   p99 {n_p99:7.2f} ms")
        print(f"  purlgate thumbnail (cached)     {t_rps:9,.0f} req/s   p99 {t_p99:7.2f} ms   "
              f"ratio {t_rps / n_rps:.2f}x nginx (goal >= 0.3)")
        print(f"  purlgate landing page           {p_rps:9,.0f} req/s   p99 {p_p99:7.2f} ms   "
              f"ratio {p_rps / n_rps:.2f}x nginx (goal p99 < 50 ms)")
        print("first views (1 render worker):")
        print(f"  thumbnails, 200 at once         {thumbs_per_s:9,.0f} drawn/s")
        print(f"  landing pages, 500 at once      {pages_per_s:9,.0f} pages/s (row read + Jinja)")
        print(f"  video 4 s 1280x720, median of 5 {statistics.median(video_times):9.2f} s "
              f"[{', '.join(f'{v:.2f}' for v in video_times)}]")
        p50, p99, built = lookup_bench(tmp, args.lookup_rows)
        print(f"row store, {args.lookup_rows:,} rows (built in {built:.1f} s):")
        print(f"  lookup of a random row          p50 {p50:.3f} ms   p99 {p99:.3f} ms "
              "(goal p99 < 5 ms)")


if __name__ == "__main__":
    main()
