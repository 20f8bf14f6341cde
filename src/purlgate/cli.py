"""purlgate's command line: serve, process, replay, check-config, hash-password.

Each command imports what it needs when it runs (the channels, the web side, Arrow),
so that ``purlgate --help`` answers at once.
"""

# Imports inside the command functions are on purpose (see above).
# ruff: noqa: PLC0415

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from purlgate import __version__
from purlgate.errors import ConfigError, PurlgateError
from purlgate.logs import setup_logging

if TYPE_CHECKING:
    from purlgate.app import Gateway
    from purlgate.config import Config

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
PROGRESS_FROM_BYTES = 16 * 1024 * 1024


DESCRIPTION = """\
A batch data-integration gateway: client data files in by email or SFTP, PURL files
(their rows plus a thumbnail and a landing-page link per row) back the same way.
Log options (-v, --log-level, --log-format) may stand anywhere on the line."""
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
def _logging_options() -> argparse.ArgumentParser:
    """The log options, accepted before and after the command (SUPPRESS: a later
    parser never overwrites what an earlier one was given)."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("logging")
    group.add_argument("-v", "--verbose", dest="log_level", action="store_const",
                       const="INFO", default=argparse.SUPPRESS,
                       help="log each event (same as --log-level info)")
    group.add_argument("--log-level", type=str.upper, choices=LEVELS,
                       default=argparse.SUPPRESS,
                       help="debug, info, warning or error (serve: info; others: warning)")
    group.add_argument("--log-format", choices=("text", "json"), default=argparse.SUPPRESS,
                       help="text lines for people, one JSON object per line for machines")
    return common


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0 to 65535)")
    return port


def _parser() -> argparse.ArgumentParser:
    common = _logging_options()
    parser = argparse.ArgumentParser(prog="purlgate", description=DESCRIPTION,
                                     parents=[common])
    parser.add_argument("--version", action="version", version=f"purlgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", parents=[common],
                       help="run a region: SMTP, IMAP, SFTP, the links' web side, workers")
    s.add_argument("--region", default=os.environ.get("PURLGATE_REGION"),
                   required="PURLGATE_REGION" not in os.environ,
                   help="the region this instance serves (default: $PURLGATE_REGION)")
    s.add_argument("--config", type=Path, default=_env_path("PURLGATE_CONFIG"),
                   help="regions.toml (default: $PURLGATE_CONFIG, else the bundled one)")
    s.add_argument("--data-dir", type=Path, help="state folder (default: the region's)")
    s.add_argument("--smtp-port", type=_port, help="override the listener port (0: any free)")

    p = sub.add_parser("process", parents=[common],
                       help="run the batch core on a local data file")
    p.add_argument("file", type=Path, help="data file (.csv .tsv .txt .dat) or .zip")
    p.add_argument("--config", type=Path, help="regions.toml (default: the bundled one)")
    p.add_argument("--region", help="region (default: the client's first region)")
    p.add_argument("--client", help="client id (default: from the file name)")
    p.add_argument("--project", help="project id (default: from the file name)")
    p.add_argument("--out", type=Path, default=Path("out"),
                   help="output folder (default: ./out)")
    p.add_argument("--data-dir", type=Path, help="state folder (default: the region's)")

    r = sub.add_parser("replay", parents=[common],
                       help="QA: send fixture emails and check the replies")
    r.add_argument("files", type=Path, nargs="+",
                   help="fixture .eml files, or a folder of them")
    r.add_argument("--smtp", required=True, type=_host_port, help="the instance, HOST:PORT")
    r.add_argument("--capture", type=_host_port,
                   help="run an SMTP sink here (the instance's relay) and check replies")
    r.add_argument("--manifest", type=Path,
                   help="expected outcomes (default: manifest.toml beside the files)")
    r.add_argument("--region", help="only the fixtures of this region")
    r.add_argument("--timeout", type=float, default=60.0, help="seconds to wait per reply")

    sub.add_parser("hash-password", parents=[common],
                   help="read a password (prompt or stdin) and print its scrypt hash for "
                        "an SFTP account's password_hash")

    b = sub.add_parser("batches", parents=[common],
                       help="list a region's batches (newest first), like the batch view")
    _region_options(b)
    b.add_argument("--client", help="only this client")
    b.add_argument("--project", help="only this project")
    b.add_argument("--status", help="only this status (e.g. Failed, 'Done with Errors')")
    b.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    b.add_argument("--json", action="store_true", help="JSON instead of a table")

    o = sub.add_parser("outbox", parents=[common],
                       help="queued replies and notifications (like mailq)")
    _region_options(o)
    act = o.add_mutually_exclusive_group()
    act.add_argument("--retry-now", metavar="ID", help="make a queued message due now")
    act.add_argument("--drop", metavar="ID", help="stop trying a message (moved to failed)")

    d = sub.add_parser("dead-letters", parents=[common],
                       help="what could not be processed (spooled mail and uploads) or "
                            "delivered (outbox/failed), and re-queue")
    _region_options(d)
    d.add_argument("--requeue", metavar="ID",
                   help="process a spool entry again, or send an outbox message again")

    e = sub.add_parser("e2e", parents=[common],
                       help="the 20-row end-to-end check before a client's launch")
    e.add_argument("--region", required=True)
    e.add_argument("--client", required=True)
    e.add_argument("--project", required=True)
    e.add_argument("--channel", required=True, choices=("email", "sftp"))
    e.add_argument("--config", type=Path, default=_env_path("PURLGATE_CONFIG"),
                   help="regions.toml (default: $PURLGATE_CONFIG, else the bundled one)")
    e.add_argument("--file", type=Path, help="send this file instead of 20 generated rows")
    e.add_argument("--smtp", type=_host_port, help="the gateway's SMTP (default: config)")
    e.add_argument("--capture", type=_host_port,
                   help="run the reply sink here, where the relay points (default: config)")
    e.add_argument("--sftp", type=_host_port, help="the gateway's SFTP (default: config)")
    e.add_argument("--sftp-password-file", type=Path, help="the client's SFTP password")
    e.add_argument("--sftp-key", type=Path, help="the client's SSH private key")
    e.add_argument("--links-base", help="fetch the links here instead of public_base_url "
                                        "(e.g. https://127.0.0.1:8443)")
    e.add_argument("--insecure", action="store_true",
                   help="accept a self-signed certificate when fetching the links")
    e.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for results")

    h = sub.add_parser("healthcheck", parents=[common],
                       help="exit 0 if the region's web side answers /healthz (containers)")
    h.add_argument("--region", default=os.environ.get("PURLGATE_REGION"),
                   help="the region (default: $PURLGATE_REGION, else the first one)")
    h.add_argument("--config", type=Path, default=_env_path("PURLGATE_CONFIG"),
                   help="regions.toml (default: $PURLGATE_CONFIG, else the bundled one)")
    h.add_argument("--timeout", type=float, default=4.0, help="seconds to wait")

    c = sub.add_parser("check-config", parents=[common],
                       help="validate regions.toml, its secrets, keys and templates")
    c.add_argument("--config", type=Path, help="regions.toml (default: the bundled one)")
    return parser


def _e2e(args: argparse.Namespace) -> int:
    import asyncio

    from purlgate.config import load_config
    from purlgate.e2e import default_target, report, run_e2e

    config = load_config(args.config)
    region = config.region(args.region)
    password = None
    if args.sftp_password_file is not None:
        try:
            password = args.sftp_password_file.read_text().rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(f"--sftp-password-file {args.sftp_password_file}: "
                              f"{exc.strerror}") from exc
    target = default_target(
        region, smtp=args.smtp, capture=args.capture, sftp=args.sftp,
        sftp_password=password, sftp_key=args.sftp_key, links_base=args.links_base,
        insecure=args.insecure or None, timeout=args.timeout)
    checks = asyncio.run(run_e2e(config, args.region, args.client, args.project,
                                 channel=args.channel, target=target, data=args.file))
    print(report(checks))
    return EXIT_OK if all(c.ok for c in checks) else EXIT_FAILED


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def _healthcheck(args: argparse.Namespace) -> int:
    import ssl
    import urllib.request

    from purlgate.config import load_config

    config = load_config(args.config)
    region_id = args.region or next(iter(config.regions))
    web = config.region(region_id).web
    if web is None:
        raise ConfigError(f"region {region_id} has no [regions.{region_id}.web] section")
    tls = web.tls_cert is not None or web.self_signed
    host = "127.0.0.1" if web.host in ("0.0.0.0", "::", "") else web.host  # noqa: S104
    url = f"{'https' if tls else 'http'}://{host}:{web.port}/healthz"
    # Our own listener on this host: its certificate names the public host, not this one.
    context = ssl._create_unverified_context() if tls else None  # noqa: S323
    try:
        with urllib.request.urlopen(url, timeout=args.timeout, context=context) as resp:  # noqa: S310
            ok = resp.status == 200
    except OSError as exc:
        print(f"purlgate: {url}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK if ok else EXIT_FAILED


def _region_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--region", help="the region (default: the first one configured)")
    p.add_argument("--config", type=Path, help="regions.toml (default: the bundled one)")
    p.add_argument("--data-dir", type=Path, help="state folder (default: the region's)")


def _region_dir(args: argparse.Namespace) -> tuple[str, Path, Config]:
    from purlgate.config import load_config

    config = load_config(args.config)
    region_id = args.region or next(iter(config.regions))
    return region_id, args.data_dir or config.region(region_id).data_dir, config


def _batches(args: argparse.Namespace) -> int:
    from purlgate.store import SqliteBatchStore
    from purlgate.web.ops import batch_view

    region_id, data_dir, _ = _region_dir(args)
    if not (data_dir / "batches.sqlite3").exists():
        print(f"purlgate: no batches yet in {data_dir} (region {region_id})", file=sys.stderr)
        return EXIT_OK
    store = SqliteBatchStore(data_dir / "batches.sqlite3")
    found = [batch_view(b) for b in store.search(client=args.client, project=args.project,
                                                 status=args.status, limit=args.limit)]
    if args.json:
        print(json.dumps({"region": region_id, "batches": found}, indent=2))
        return EXIT_OK
    print(f"{'ID':>5}  {'STATUS':<16} {'CLIENT':<10} {'PROJECT':<10} {'CHANNEL':<7} "
          f"{'ROWS':>7} {'OK':>7} {'ERR':>5}  {'RECEIVED (UTC)':<19}  FILE")
    for b in found:
        print(f"{b['id']:>5}  {b['status']:<16} {b['client']:<10} {b['project'] or '-':<10} "
              f"{b['channel']:<7} {b['rows']:>7} {b['rows_ok']:>7} {b['rows_error']:>5}  "
              f"{b['received_at'][:19].replace('T', ' '):<19}  {b['file']}")
    if not found:
        print("(no batches match)")
    return EXIT_OK


def _outbox_of(args: argparse.Namespace) -> Any:
    from purlgate.channels.outbox import Outbox

    _, data_dir, config = _region_dir(args)
    region = config.regions[args.region or next(iter(config.regions))]

    async def never(data: bytes, sender: str, recipients: Sequence[str]) -> None:
        raise AssertionError("the outbox command never sends")

    return Outbox(data_dir / "outbox", region.relay, sender=never)


def _outbox(args: argparse.Namespace) -> int:
    import time

    outbox = _outbox_of(args)
    try:
        if args.retry_now:
            outbox.retry_now(args.retry_now)
            print(f"{args.retry_now}: due now (a running gateway sends it within 30 s)")
            return EXIT_OK
        if args.drop:
            outbox.drop(args.drop)
            print(f"{args.drop}: dropped; it is kept in {outbox.failed}")
            return EXIT_OK
    except KeyError as exc:
        raise ConfigError(f"no queued message {exc.args[0]!r}; `purlgate outbox` lists them") \
            from exc
    items = outbox.items()
    now = time.time()
    print(f"{'ID':<44} {'TRIES':>5} {'AGE':>8} {'NEXT TRY':>9}  RECIPIENTS / LAST ERROR")
    for item in items:
        meta = item.meta
        print(f"{item.id:<44} {meta['attempts']:>5} {now - meta['created_at']:>7.0f}s "
              f"{max(0.0, meta['next_at'] - now):>8.0f}s  {', '.join(meta['recipients'])}"
              + (f" / {meta['last_error']}" if meta.get("last_error") else ""))
    print(f"-- {len(items)} message(s) queued")
    return EXIT_OK


def _dead_letters(args: argparse.Namespace) -> int:
    import time

    from purlgate.channels.sftp import SftpSpool
    from purlgate.channels.spool import Spool

    outbox = _outbox_of(args)
    _, data_dir, _ = _region_dir(args)
    # Spooled mail and uploads that could not be processed, beside mail that could not
    # be delivered: all three wait for an operator.
    spools: list[tuple[str, Any]] = [("mail", Spool(data_dir / "spool", owner=False))]
    if (data_dir / "sftp-spool").is_dir():
        spools.append(("sftp", SftpSpool(data_dir / "sftp-spool", owner=False)))
    if args.requeue:
        for _kind, spool in spools:
            try:
                spool.requeue(args.requeue)
            except KeyError:
                continue
            print(f"{args.requeue}: back in the spool (a running gateway takes it within "
                  "30 s, else at its next start)")
            return EXIT_OK
        try:
            outbox.requeue(args.requeue)
        except KeyError as exc:
            raise ConfigError(f"no dead letter {exc.args[0]!r}; `purlgate dead-letters` "
                              "lists them") from exc
        print(f"{args.requeue}: queued again (a running gateway sends it within 30 s)")
        return EXIT_OK
    now = time.time()
    print(f"{'SPOOL ENTRY':<34} {'CHANNEL':<7} {'CLIENT':<12} {'TRIES':>5} {'AGE':>8}  ERROR")
    count = 0
    for kind, spool in spools:
        for entry_id, reason in spool.dead_entries():
            count += 1
            print(f"{entry_id:<34} {reason.get('channel') or kind:<7} "
                  f"{reason.get('client') or '-':<12} {reason.get('attempts', '?'):>5} "
                  f"{now - float(reason.get('at', now)):>7.0f}s  {reason.get('error', '-')}")
    print(f"-- {count} message(s) or upload(s) not processed")
    items = outbox.failed_items()
    print(f"\n{'OUTBOX ID':<44} {'TRIES':>5}  RECIPIENTS / LAST ERROR")
    for item in items:
        meta = item.meta
        print(f"{item.id:<44} {meta['attempts']:>5}  {', '.join(meta['recipients'])} / "
              f"{meta.get('last_error') or '-'}")
    print(f"-- {len(items)} message(s) not delivered, in {outbox.failed}")
    return EXIT_OK


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)


def _hash_password() -> int:
    import getpass

    from purlgate.passwords import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("purlgate: the passwords differ", file=sys.stderr)
            return EXIT_USAGE
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("purlgate: empty password", file=sys.stderr)
        return EXIT_USAGE
    print(hash_password(password))
    return EXIT_OK


def _replay(args: argparse.Namespace) -> int:
    import asyncio

    from purlgate.replay import replay, table

    files: list[Path] = []
    for path in args.files:  # a folder stands for the .eml files in it
        if path.is_dir():
            files.extend(sorted(path.glob("*.eml")))
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"{path}: no such file or folder")
    if not files:
        raise ConfigError(f"no .eml files in {', '.join(map(str, args.files))}")
    manifest = args.manifest or files[0].parent / "manifest.toml"
    if not manifest.is_file():
        raise ConfigError(f"{manifest}: no such manifest; give the expected outcomes with "
                          "--manifest FILE (default: manifest.toml beside the files)")
    results = asyncio.run(replay(
        files, smtp=args.smtp, capture=args.capture, manifest=manifest,
        region=args.region, timeout=args.timeout,
    ))
    print(table(results))
    return EXIT_OK if results and all(r.ok for r in results) else EXIT_FAILED


def _pick_client(config: Config, args: argparse.Namespace) -> str | None:
    if args.client:
        if args.client not in config.clients:
            raise ConfigError(f"unknown client {args.client!r}; known: "
                              + ", ".join(config.clients))
        return str(args.client)
    from purlgate.core.naming import client_from_name

    return client_from_name(args.file.name, config.clients)


def _process(args: argparse.Namespace) -> int:
    from purlgate.config import load_config
    from purlgate.core.archive import needs_password
    from purlgate.core.crypto import looks_like_pgp
    from purlgate.core.lifecycle import BatchState
    from purlgate.core.pipeline import Submission
    from purlgate.region import build_region

    config = load_config(args.config)
    path: Path = args.file
    if not path.is_file():
        print(f"purlgate: {path}: no such file", file=sys.stderr)
        return EXIT_USAGE
    client_id = _pick_client(config, args)
    region_id = args.region or (config.clients[client_id].regions[0] if client_id
                                else next(iter(config.regions)))
    region = build_region(config, region_id, data_dir=args.data_dir)
    client = config.clients.get(client_id) if client_id else None
    # The password is read only when it matters, for an encrypted ZIP (a missing secret
    # is then a configuration error); a plain file or ZIP does not need it.
    password = None
    # Read only when it can matter: an encrypted ZIP, or a PGP file that may hold one.
    if client and client.zip_password and (needs_password(path, path.name)
                                           or looks_like_pgp(path, path.name)):
        password = client.zip_password.reveal()
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)

    size = path.stat().st_size
    bar: Any = None
    if size >= PROGRESS_FROM_BYTES:
        from tqdm import tqdm

        bar = tqdm(total=size, unit="B", unit_scale=True, desc=path.name, disable=None,
                   file=sys.stderr)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.n = min(done, total)
            bar.refresh()

    try:
        outcome = region.processor.process(
            Submission(path=path, received_name=path.name, channel="cli",
                       client_id=client_id, project_id=args.project, zip_password=password),
            out_dir, progress,
        )
    finally:
        if bar is not None:
            bar.close()
        region.close()
    batch = outcome.batch
    print(f"batch     {batch.id} ({region_id}, client {batch.client}, "
          f"project {batch.project or '-'})")
    print(f"status    {batch.state}")
    print(f"rows      {batch.counts.rows_total} read, {batch.counts.rows_ok} in the PURL file, "
          f"{batch.counts.rows_error} with errors")
    for label, out in (("purl", outcome.purl), ("flag", outcome.flag),
                       ("errors", outcome.errors)):
        if out is not None:
            print(f"{label:<9} {out.resolve()}")
    if batch.state is BatchState.FAILED:
        print(f"purlgate: batch failed: {batch.reason}", file=sys.stderr)
        if batch.error_code in ("render-auth", "pgp-encrypt"):
            # The reason is written for a client of `serve`, which mails the operator;
            # here nobody else is told.
            print("purlgate: (process sends no alert: you are the operator here)",
                  file=sys.stderr)
        if batch.error_code == "bad-file-name" and args.client is None:
            print("purlgate: --client and --project name them when the file name does not",
                  file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from purlgate.app import build_gateway, serve
    from purlgate.config import load_config, secret_refs

    config = load_config(args.config)
    config.region(args.region)
    # Every secret this region uses, read now: a missing one is an operator's error to
    # hear at start, not a client's message to dead-letter later.
    ours = {f"region {args.region}", *(f"client {c}" for c in config.clients_of(args.region))}
    for where, ref in secret_refs(config):
        if where.split(",")[0] in ours:
            try:
                ref.reveal()
            except ConfigError as exc:
                raise ConfigError(f"{exc.message} ({where}); `purlgate check-config` checks "
                                  "them all") from exc
    if args.smtp_port is not None:
        region = config.regions[args.region]
        smtp = region.smtp.model_copy(update={"port": args.smtp_port})
        config = config.model_copy(update={"regions": {
            **config.regions, args.region: region.model_copy(update={"smtp": smtp})}})
    gateway = build_gateway(config, args.region, data_dir=args.data_dir)

    def ready(gw: Gateway) -> None:
        smtp = gw.region.config.smtp
        sftp = (f"; SFTP on {gw.region.config.sftp.host}:{gw.sftp_port}"
                if gw.region.config.sftp is not None and gw.sftp is not None else "")
        print(f"purlgate {__version__}: region {args.region} accepting mail for "
              f"{', '.join(gw.region.config.inbound_addresses)} on "
              f"{smtp.host}:{gw.smtp_port}{sftp}; relay {gw.region.config.relay.host}:"
              f"{gw.region.config.relay.port}", flush=True)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(gateway, stop, ready)

    asyncio.run(main())
    return EXIT_OK


def _check_config(args: argparse.Namespace) -> int:
    from purlgate.config import load_config, secret_refs
    from purlgate.pgp import check_passphrase
    from purlgate.web.templates import Template

    config = load_config(args.config)
    problems = []
    for where, ref in secret_refs(config):  # every secret: relay, IMAP, keys, passwords
        try:
            secret = ref.reveal()
            if where.endswith("field pgp.passphrase"):
                check_passphrase(secret.decode("utf-8", "replace"))
        except ConfigError as exc:
            problems.append(f"  {where}: {exc.message}")
    for client_id, client in config.clients.items():
        for project_id, project in client.projects.items():
            if project.render.template is not None:
                try:
                    Template(project.render.template)
                except ConfigError as exc:
                    problems.append(f"  client {client_id}, project {project_id}, field "
                                    f"render.template: {exc.message}")
        if client.pgp_public_key is not None and not client.pgp_public_key.is_file():
            problems.append(f"  client {client_id}, field pgp_public_key: no file "
                            f"{client.pgp_public_key}")
    warnings: list[str] = []
    if not problems:  # the keys themselves: each one opened, pinned and dated
        for region_id in config.regions:
            for fatal, message in _key_report(config, region_id):
                (problems if fatal else warnings).append(f"  region {region_id}: {message}")
    for warning in warnings:
        print(f"warning:{warning}")
    if problems:
        raise ConfigError(f"{len(problems)} problem(s):\n" + "\n".join(problems))
    for region_id, region in config.regions.items():
        clients = config.clients_of(region_id)
        print(f"region {region_id}: {', '.join(region.inbound_addresses)}; "
              f"{len(clients)} client(s): "
              + ", ".join(f"{cid} ({', '.join(c.projects)})" for cid, c in clients.items()))
    print("configuration OK" + (f" ({len(warnings)} warning(s))" if warnings else ""))
    return EXIT_OK


def _key_report(config: Config, region_id: str) -> list[tuple[bool, str]]:
    """Open the region's keyring as serve would (a scratch copy when our key comes from a
    secret) and report keys that are expired, revoked or expire within 30 days."""
    import tempfile

    from purlgate.pgp import GpgKeyStore

    region = config.regions[region_id]
    if region.pgp is None:
        return []
    client_keys = config.client_keys(region_id)
    with tempfile.TemporaryDirectory() as scratch:
        pgp = region.pgp
        if pgp.private_key is not None:  # nothing of the real keyring is touched
            pgp = pgp.model_copy(update={"home": Path(scratch) / "gnupg"})
        try:
            keys = GpgKeyStore.open(pgp, region.data_dir, client_keys)
        except ConfigError as exc:
            return [(True, exc.message)]
        keys.close()
        return keys.key_report


def main(argv: Sequence[str] | None = None) -> int:
    # What we create is ours alone unless a file says otherwise (results are 0640).
    os.umask(0o077)
    # We use no pydantic plugins; looking for them scans every installed package's
    # metadata (about 11 ms of each command's start).
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    args = _parser().parse_args(argv)
    default = "INFO" if args.command == "serve" else "WARNING"
    setup_logging(getattr(args, "log_level", default), getattr(args, "log_format", "text"))
    try:
        if args.command == "process":
            return _process(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "replay":
            return _replay(args)
        if args.command == "hash-password":
            return _hash_password()
        if args.command == "e2e":
            return _e2e(args)
        if args.command == "healthcheck":
            return _healthcheck(args)
        if args.command == "batches":
            return _batches(args)
        if args.command == "outbox":
            return _outbox(args)
        if args.command == "dead-letters":
            return _dead_letters(args)
        return _check_config(args)
    except ConfigError as exc:
        print(f"purlgate: configuration error: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except PurlgateError as exc:
        print(f"purlgate: {exc.message}", file=sys.stderr)
        if args.command == "process" and exc.code == "bad-file-name":
            print("purlgate: --client and --project name them when the file name does not",
                  file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
