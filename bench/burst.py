"""Benchmark: a burst of client mail answered end to end by a real `purlgate serve`.

    python bench/burst.py [--messages 500] [--sessions 20] [--setup processes:2]
                          [--baseline threads:1]

N twenty-row emails (AES ZIP, as the bundled demo client sends them) go over S
concurrent SMTP sessions to a `purlgate serve` subprocess whose relay is an SMTP sink in
this process. Once 20 warm-up messages have their replies (a running gateway, not one
starting), timed: the durable-accept rate (N / time until the last 250), the end-to-end
rate (N / time from the first MAIL to the last reply at the relay), the reply latency
per message (its 250 to its reply at the relay), p50 and p99, and the CPU time per
message of the gateway, its worker processes and this benchmark (client and relay).
Each reply is checked to arrive exactly once. The same burst first runs against the
``--baseline`` set-up, and the figures are printed side by side with their ratio.

    python bench/burst.py --big-rows 1000000

While one client's file of that many rows runs, 50 twenty-row emails from another
client are sent one after another: their reply latency p99, beside the same 50 with no
big file in the way.
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
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.smtp import INBOUND, ROOT, SENDER, config_text, email, free_port

PYSPY_MODE = os.environ.get("PYSPY_MODE", "--gil").split()
OTHER = "files@beta.example"
WARMUP = 20  # messages answered before the measured burst
BETA = """
[clients.beta]
name = "Beta (benchmark)"
regions = ["usa"]
senders = ["files@beta.example"]
zip_password = {{ file = "{root}/fixtures/secrets/acme-zip-password" }}

[clients.beta.projects.big]
keep_all_columns = true
"""


class Relay:
    """The relay: records when each reply (by In-Reply-To) arrives, and how often."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.count: Counter[str] = Counter()

    async def handle_DATA(self, server: object, session: object,  # noqa: N802
                          envelope: object) -> str:
        raw: bytes = envelope.original_content or b""  # type: ignore[attr-defined]
        head = raw.split(b"\r\n\r\n", 1)[0]
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"in-reply-to:"):
                key = line.split(b":", 1)[1].strip().decode()
                self.count[key] += 1
                self.arrived.setdefault(key, time.perf_counter())
        return "250 OK"


def write_config(tmp: Path, smtp_port: int, relay_port: int, workers: int,
                 mode: str = "processes") -> Path:
    text = config_text(smtp_port, relay_port)
    text = text.replace('data_dir = "var/usa"', f'data_dir = "{tmp}/state"')
    text = text.replace("port = 8443\n", "port = 0\n").replace("port = 8453\n", "port = 0\n")
    text = text.replace("[regions.usa.limits]", f"[regions.usa.processing]\nworkers = {workers}"
                        f'\nmode = "{mode}"\n\n[regions.usa.limits]')
    text += BETA.format(root=ROOT)
    path = tmp / "regions.toml"
    path.write_text(text)
    return path


async def start_serve(config: Path, smtp_port: int, *extra: str,
                      env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`purlgate serve` of region usa (``extra``: more of its options), once it takes
    mail on ``smtp_port``."""
    exe = str(Path(sys.executable).with_name("purlgate"))
    child = subprocess.Popen([exe, "serve", "--config", str(config), "--region", "usa",
                              *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True, env={**os.environ, **(env or {})})
    for _ in range(300):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", smtp_port)
            writer.close()
        except OSError:
            await asyncio.sleep(0.05)
        else:
            return child
    child.kill()
    raise SystemExit("purlgate serve did not start")


def stop_serve(child: subprocess.Popen[bytes]) -> None:
    os.killpg(child.pid, signal.SIGTERM)
    child.wait(timeout=60)


def message(i: int, password: bytes, sender: str = SENDER) -> tuple[str, bytes]:
    raw = email(i, password)
    if sender != SENDER:
        raw = raw.replace(SENDER.encode(), sender.encode())
    msgid = raw.split(b"Message-ID: ")[1].split(b"\r\n")[0].decode()
    return msgid, raw


async def session(port: int, share: list[tuple[str, bytes]],
                  accepted: dict[str, float]) -> None:
    """One SMTP session sending ``share`` one after another; when each got its 250."""
    import aiosmtplib

    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=120)
    await client.connect()
    for msgid, raw in share:
        await client.sendmail(SENDER, [INBOUND], raw)
        accepted[msgid] = time.perf_counter()
    await client.quit()


def tree_cpu(root: int) -> dict[int, tuple[float, float]]:
    """CPU seconds of a process and each of its descendants, by pid: (user + system,
    system alone)."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    system: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
        system[int(entry.name)] = int(fields[12]) / tick
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in tree:
                tree.add(pid)
                frontier.append(pid)
    return {pid: (times[pid], system[pid]) for pid in tree if pid in times}


def calibrate() -> float:
    """Milliseconds for a fixed loop of plain Python (best of 5): this VM's speed
    drifts by up to 2x from minute to minute, and this says how fast it was."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        sum(len(str(i)) for i in range(200_000))
        best = min(best, time.perf_counter() - start)
    return 1000 * best


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy (all cores; kernel threads included)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def profile_summary(raw: Path, what: str, top: int = 22) -> None:
    """py-spy's collapsed stacks of the thread holding the GIL (the one resource every
    Python thread of a process shares), as time inside each function (inclusive)."""
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1]
                  + ")" if " (" in f else f for f in stack.split(";")]
        n = int(count)
        total += n
        for frame in set(frames):
            inclusive[frame] += n
    print(f"profile of {what} (py-spy --gil, {total} samples), share of GIL time inside:")
    for frame, n in inclusive.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {frame}")


async def burst(messages: int, sessions: int, setup: str,
                profile: Path | None = None) -> dict[str, float]:
    import aiosmtplib
    from aiosmtpd.smtp import SMTP

    password = (ROOT / "fixtures" / "secrets" / "acme-zip-password").read_bytes().strip()
    mails = [message(i, password) for i in range(messages)]
    warmup = [message(messages + i, password) for i in range(WARMUP)]
    relay = Relay()
    relay_port, smtp_port = free_port(), free_port()
    server = await asyncio.get_running_loop().create_server(lambda: SMTP(relay),
                                                            "127.0.0.1", relay_port)
    with tempfile.TemporaryDirectory() as tmp_name:
        mode, _, workers = setup.partition(":")
        child = await start_serve(write_config(Path(tmp_name), smtp_port, relay_port,
                                               int(workers), mode), smtp_port)
        # A running gateway, not one starting: a few replies before the clock starts.
        await asyncio.gather(*(aiosmtplib.send(raw, sender=SENDER, recipients=[INBOUND],
                                               hostname="127.0.0.1", port=smtp_port,
                                               start_tls=False) for _, raw in warmup))
        while any(msgid not in relay.arrived for msgid, _ in warmup):
            await asyncio.sleep(0.01)
        accepted: dict[str, float] = {}
        spies = []
        if profile is not None:
            # The gateway, and one of its mail worker processes.
            workers = [pid for pid in tree_cpu(child.pid) if b"spawn_main" in
                       Path(f"/proc/{pid}/cmdline").read_bytes()]
            for pid, out in ((child.pid, profile), (workers[0], profile.with_suffix(".w"))):
                spies.append(subprocess.Popen(
                    ["py-spy", "record", "--pid", str(pid), "--format", "raw", "--rate",
                     "100", *PYSPY_MODE, "-o", str(out)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            await asyncio.sleep(1.0)
        try:
            cpu_before = tree_cpu(child.pid)
            busy_before = machine_busy()
            own_before = time.process_time()
            start = time.perf_counter()

            await asyncio.gather(*(session(smtp_port, mails[k::sessions], accepted)
                                   for k in range(sessions)))
            last_accept = time.perf_counter()
            deadline = time.perf_counter() + 600
            while len(relay.arrived) < messages and time.perf_counter() < deadline:
                await asyncio.sleep(0.01)
            end = max(relay.arrived.values())
            cpu_after = tree_cpu(child.pid)
            busy = machine_busy() - busy_before
            own_cpu = time.process_time() - own_before
            await asyncio.sleep(1.0)  # anything sent twice would arrive now
        finally:
            for spy in spies:
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=60)
            stop_serve(child)
            server.close()
    missing = [m for m, _ in mails + warmup if m not in relay.arrived]
    twice = [m for m, n in relay.count.items() if n > 1]
    assert not missing and not twice, f"{len(missing)} replies missing, {len(twice)} twice"
    latencies = [relay.arrived[m] - accepted[m] for m, _ in mails]
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    used = {pid: t - cpu_before.get(pid, (0.0, 0.0))[0] for pid, (t, _) in cpu_after.items()}
    kernel = sum(k - cpu_before.get(pid, (0.0, 0.0))[1] for pid, (_, k) in cpu_after.items())
    gateway = used.pop(child.pid, 0.0)
    return {"accept": messages / (last_accept - start), "e2e": messages / (end - start),
            "p50": statistics.median(latencies), "p99": q[98],
            "cpu_gateway": 1000 * gateway / messages,
            "cpu_workers": 1000 * sum(used.values()) / messages,
            "cpu_bench": 1000 * own_cpu / messages,
            "cpu_kernel": 1000 * kernel / messages,
            "cpu_other": 1000 * (busy - gateway - sum(used.values()) - own_cpu) / messages}


async def beside_big(rows: int, small: int, workers: int) -> tuple[list[float], list[float]]:
    """Latencies of ``small`` twenty-row mails from acme, with and without beta's big
    file running."""
    import aiosmtplib
    from aiosmtpd.smtp import SMTP

    from purlgate.core.archive import aes_zip

    password = (ROOT / "fixtures" / "secrets" / "acme-zip-password").read_bytes().strip()
    relay = Relay()
    relay_port, smtp_port = free_port(), free_port()
    # The big file's reply (its PURL file zipped) is larger than aiosmtpd's default limit.
    server = await asyncio.get_running_loop().create_server(
        lambda: SMTP(relay, data_size_limit=None), "127.0.0.1", relay_port)

    async def one(msgid: str, raw: bytes, sender: str) -> float:
        start = time.perf_counter()
        await aiosmtplib.send(raw, sender=sender, recipients=[INBOUND], hostname="127.0.0.1",
                              port=smtp_port, start_tls=False, timeout=300)
        while msgid not in relay.arrived:
            await asyncio.sleep(0.002)
        return relay.arrived[msgid] - start

    body = "".join(f"Name{i},u{i}@beta.example,{i % 97}\n" for i in range(rows))
    zipped = aes_zip({"beta_big_20261127_120000.csv":
                      ("first_name,email,score\n" + body).encode()}, password)
    from email.message import EmailMessage
    from email.policy import SMTP as SMTP_POLICY

    big = EmailMessage()
    big["From"], big["To"], big["Subject"] = OTHER, INBOUND, "big"
    big["Message-ID"] = "<big-file@beta.example>"
    big.set_content("big file")
    big.add_attachment(zipped, maintype="application", subtype="zip",
                       filename="beta_big_20261127_120000.zip")
    with tempfile.TemporaryDirectory() as tmp_name:
        child = await start_serve(write_config(Path(tmp_name), smtp_port, relay_port,
                                               workers), smtp_port)
        try:
            alone = [await one(*message(i, password), SENDER) for i in range(small)]
            await aiosmtplib.send(big.as_bytes(policy=SMTP_POLICY), sender=OTHER,
                                  recipients=[INBOUND], hostname="127.0.0.1",
                                  port=smtp_port, start_tls=False, timeout=300)
            big_started = time.perf_counter()
            # Small mails one after another for as long as the big file runs.
            beside, i = [], small
            while "<big-file@beta.example>" not in relay.arrived:
                beside.append(await one(*message(i, password), SENDER))
                i += 1
            big_seconds = relay.arrived["<big-file@beta.example>"] - big_started
        finally:
            stop_serve(child)
            server.close()
    print(f"  the {rows:,}-row file took {big_seconds:.1f} s from its 250 to its reply; "
          f"{len(beside)} small mails were answered meanwhile")
    return alone, beside


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2, help="(with --big-rows)")
    parser.add_argument("--setup", default="processes:2", help="MODE:WORKERS measured")
    parser.add_argument("--baseline", default="threads:1", help="MODE:WORKERS beside it")
    parser.add_argument("--big-rows", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each set-up this many times (in turns); medians")
    parser.add_argument("--profile", action="store_true",
                        help="also profile the gateway and a worker process in the second "
                             "run with py-spy (pip install py-spy)")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores; purlgate serve in a subprocess, relay sink here")
    if args.big_rows:
        alone, beside = asyncio.run(beside_big(args.big_rows, 50, args.workers))
        print(f"50 twenty-row emails from acme, one after another ({args.workers} workers):")
        print(f"  alone                     p50 {statistics.median(alone):6.3f} s   "
              f"p99 {p99(alone):6.3f} s")
        print(f"  beside a {args.big_rows:,}-row file  p50 {statistics.median(beside):6.3f} s"
              f"   p99 {p99(beside):6.3f} s   ratio p99 {p99(beside) / p99(alone):5.2f}")
        return
    raw = Path(tempfile.gettempdir()) / "purlgate-burst-profile.txt"
    setups = list(dict.fromkeys((args.baseline, args.setup)))
    runs: dict[str, list[dict[str, float]]] = {setup: [] for setup in setups}
    for k in range(args.repeat):
        for setup in setups:
            speed = calibrate()
            result = asyncio.run(burst(
                args.messages, args.sessions, setup,
                raw if args.profile and setup == args.setup and k == 0 else None))
            result["calibration"] = speed
            runs[setup].append(result)
            print(f"  run {k + 1} {setup:<12} end to end {result['e2e']:6.2f} msg/s; "
                  f"calibration loop {speed:5.1f} ms", flush=True)
    base = {key: statistics.median(r[key] for r in runs[args.baseline])
            for key in runs[args.baseline][0]}
    ours = {key: statistics.median(r[key] for r in runs[args.setup])
            for key in runs[args.setup][0]}
    print(f"{args.messages} twenty-row emails over {args.sessions} SMTP sessions, "
          "each reply checked to arrive exactly once"
          + (f" (medians of {args.repeat} runs)" if args.repeat > 1 else "") + ":")
    print(f"{'':28}{args.baseline:>14}{args.setup:>14}{'ratio':>8}")
    for label, key in (("durable accept (msg/s)", "accept"),
                       ("end to end (msg/s)", "e2e"),
                       ("reply latency p50 (s)", "p50"),
                       ("reply latency p99 (s)", "p99"),
                       ("CPU ms/msg, gateway", "cpu_gateway"),
                       ("CPU ms/msg, workers", "cpu_workers"),
                       ("CPU ms/msg, benchmark", "cpu_bench"),
                       ("CPU ms/msg, rest of machine", "cpu_other"),
                       ("  of gateway+workers: kernel", "cpu_kernel"),
                       ("calibration loop (ms)", "calibration")):
        ratio = f"{ours[key] / base[key]:>8.2f}" if base[key] else f"{'-':>8}"
        print(f"  {label:<26}{base[key]:>14.2f}{ours[key]:>14.2f}{ratio}")
    if args.profile:
        profile_summary(raw, "the gateway")
        profile_summary(raw.with_suffix(".w"), "a mail worker process")


if __name__ == "__main__":
    main()
