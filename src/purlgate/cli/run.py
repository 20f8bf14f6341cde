"""The commands that run the gateway or its core: serve, process, check-config,
hash-password."""

# Imports inside the command functions are on purpose: each command imports what it
# needs when it runs, so that ``purlgate --help`` answers at once.
# ruff: noqa: PLC0415

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from purlgate import __version__
from purlgate.cli.common import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from purlgate.errors import ConfigError

if TYPE_CHECKING:
    from purlgate.app import Gateway
    from purlgate.config import Config
    from purlgate.core.pipeline import BatchOutcome, Submission
    from purlgate.region import Region

PROGRESS_FROM_BYTES = 16 * 1024 * 1024


def serve(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from purlgate.app import build_gateway, serve
    from purlgate.config import load_config, secret_refs
    from purlgate.logs import announce

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
    _one_embedded_instance(config, args)
    gateway = build_gateway(config, args.region, data_dir=args.data_dir)

    def ready(gw: Gateway) -> None:
        smtp = gw.region.config.smtp
        sftp = (f"; SFTP on {gw.region.config.sftp.host}:{gw.sftp_port}"
                if gw.region.config.sftp is not None and gw.sftp is not None else "")
        announce(f"purlgate {__version__}: region {args.region} accepting mail for "
                 f"{', '.join(gw.region.config.inbound_addresses)} on "
                 f"{smtp.host}:{gw.smtp_port}{sftp}; relay {gw.region.config.relay.host}:"
                 f"{gw.region.config.relay.port}", event="ready", region=args.region,
                 smtp_port=gw.smtp_port, sftp_port=gw.sftp_port if gw.sftp else None,
                 web_port=gw.web_port or None)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(gateway, stop, ready)

    asyncio.run(main())
    return EXIT_OK


_held: list[object] = []  # the data_dir lock, held as long as this process serves


def _one_embedded_instance(config: Config, args: argparse.Namespace) -> None:
    """A region on the embedded SQLite backend is one instance: a second `serve` on the
    same data_dir (another host on a shared mount, a second container) is refused at
    start, as it would answer the same mail twice. The lock goes with the process,
    however it ends."""
    import fcntl

    region = config.region(args.region)
    if region.database is not None:
        return
    data_dir: Path = args.data_dir or region.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = (data_dir / ".serve.lock").open("a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        lock.close()
        raise ConfigError(
            f"another `purlgate serve` of region {args.region} uses {data_dir}; a region "
            f"runs several instances only on a shared database ([regions.{args.region}."
            "database], README: Running several instances)") from exc
    _held.append(lock)


def _pick_client(config: Config, args: argparse.Namespace) -> str | None:
    if args.client:
        if args.client not in config.clients:
            raise ConfigError(f"unknown client {args.client!r}; known: "
                              + ", ".join(config.clients))
        return str(args.client)
    from purlgate.core.naming import client_from_name

    return client_from_name(args.file.name, config.clients)


def _local(args: argparse.Namespace) -> tuple[Region, Submission, Path] | None:
    """`process` and `validate`: the region, the file as a submission, the output
    folder (made); None when there is no such file (said on stderr)."""
    from purlgate.config import load_config
    from purlgate.core.pipeline import Submission
    from purlgate.region import build_region

    config = load_config(args.config)
    path: Path = args.file
    if not path.is_file():
        print(f"purlgate: {path}: no such file", file=sys.stderr)
        return None
    client_id = _pick_client(config, args)
    region_id = args.region or (config.clients[client_id].regions[0] if client_id
                                else next(iter(config.regions)))
    region = build_region(config, region_id, data_dir=args.data_dir)
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    return region, Submission(
        path=path, received_name=path.name, channel="cli", client_id=client_id,
        project_id=args.project, zip_password=_zip_password(config, client_id, path),
        source=f"{path.name} on {socket.gethostname()}"), out_dir


def process(args: argparse.Namespace) -> int:
    found = _local(args)
    if found is None:
        return EXIT_USAGE
    region, submission, out_dir = found
    bar = _progress_bar(submission.path)
    try:
        outcome = region.processor.process(submission, out_dir,
                                           bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
        region.close()
    return _report(outcome, region.id, args)


def validate(args: argparse.Namespace) -> int:
    """Check a data file as a batch would, and make nothing (core/validation.py)."""
    from purlgate.core.validation import describe
    from purlgate.core.validation import validate as check

    found = _local(args)
    if found is None:
        return EXIT_USAGE
    region, submission, out_dir = found
    try:
        outcome = check(region.processor, submission, out_dir)
    finally:
        region.close()
    print(describe(outcome), end="")
    return EXIT_OK if outcome.valid else EXIT_FAILED


def _zip_password(config: Config, client_id: str | None, path: Path) -> bytes | None:
    """The client's ZIP password, read only when it can matter (an encrypted ZIP, or a
    PGP file that may hold one): a plain file needs no secret, and a missing one is
    then a configuration error."""
    from purlgate.core.archive import needs_password
    from purlgate.core.crypto import looks_like_pgp

    client = config.clients.get(client_id) if client_id else None
    if client and client.zip_password and (needs_password(path, path.name)
                                           or looks_like_pgp(path, path.name)):
        return client.zip_password.reveal()
    return None


class _Bar:
    """A progress bar on stderr (a terminal only) for a file of PROGRESS_FROM_BYTES+."""

    def __init__(self, path: Path, size: int) -> None:
        from tqdm import tqdm

        self._bar: Any = tqdm(total=size, unit="B", unit_scale=True, desc=path.name,
                              disable=None, file=sys.stderr)

    def update(self, done: int, total: int) -> None:
        self._bar.total = total
        self._bar.n = min(done, total)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


def _progress_bar(path: Path) -> _Bar | None:
    size = path.stat().st_size
    return _Bar(path, size) if size >= PROGRESS_FROM_BYTES else None


def _report(outcome: BatchOutcome, region_id: str, args: argparse.Namespace) -> int:
    """What ``process`` prints, and its exit code (1: the batch failed)."""
    from purlgate.core.lifecycle import BatchState

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
    if batch.state is not BatchState.FAILED:
        return EXIT_OK
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


def check_config(args: argparse.Namespace) -> int:
    from purlgate.config import load_config

    config = load_config(args.config)
    problems = [*_secret_problems(config), *_file_problems(config)]
    warnings: list[str] = []
    if not problems:  # the keys themselves: each one opened, pinned and dated
        for region_id in config.regions:
            for fatal, message in [*_key_report(config, region_id),
                                   *_database_report(config, region_id),
                                   *_sender_report(config, region_id),
                                   *_retired_report(config, region_id)]:
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


def _retired_report(config: Config, region_id: str) -> list[tuple[bool, str]]:
    """Settings still read but no longer used: a warning each."""
    if config.region(region_id).relay.max_inflight_bytes is not None:
        return [(False, "field relay.max_inflight_bytes has no effect any more: each "
                        "delivery streams its message from disk; remove it")]
    return []


def _database_report(config: Config, region_id: str) -> list[tuple[bool, str]]:
    """The region's database reached once: (fatal, what is wrong) if anything is."""
    settings = config.region(region_id).database
    if settings is None:
        return []
    from purlgate.errors import StorageError
    from purlgate.postgres import MIGRATIONS, probe

    try:
        version = probe(settings.url.reveal().decode(), settings.connect_timeout_seconds)
    except StorageError as exc:
        return [(True, f"field database.url: {exc.message}")]
    if version > len(MIGRATIONS):
        return [(True, f"field database.url: the database is of schema {version}, newer "
                       f"than this release ({len(MIGRATIONS)}): run the newer release")]
    if 0 < version < len(MIGRATIONS):  # (0: empty, made by the first start as usual)
        return [(False, f"field database.url: the database is of schema {version}; the "
                        f"first instance to start brings it to {len(MIGRATIONS)}")]
    return []


def _sender_report(config: Config, region_id: str) -> list[tuple[bool, str]]:
    """Warnings for the clients whose mail must pass DMARC or DKIM (require-*) while a
    sender domain of theirs publishes no DMARC policy: their mail would be refused."""
    from purlgate.channels.resolver import DnsUnavailableError, Resolver
    from purlgate.channels.sender_auth import SenderChecks

    region = config.region(region_id)
    checks = SenderChecks(region.sender_auth, Resolver(region.dns),
                          hostname=region.smtp.hostname)  # (all of it: a command)
    found: list[tuple[bool, str]] = []
    for client_id, client in config.clients_of(region_id).items():
        if client.sender_auth == "record":
            continue
        for domain in sorted({s.rsplit("@", 1)[1] for s in client.senders}):
            try:
                record, _ = checks.dmarc_record(domain)
            except DnsUnavailableError:
                found.append((False, f"client {client_id} ({client.sender_auth}): could not "
                                     f"look up the DMARC policy of {domain} (DNS did not "
                                     "answer)"))
                continue
            if record is None:
                then = ("its mail will be refused until it does" if
                        client.sender_auth == "require-dmarc" else
                        f"its mail is still taken when signed with DKIM for {domain}, but "
                        "other receivers have no policy to refuse forgeries of it")
                found.append((False, f"client {client_id} ({client.sender_auth}): {domain} "
                                     f"publishes no DMARC policy (_dmarc.{domain}): {then}"))
    return found


def _secret_problems(config: Config) -> list[str]:
    """Every secret (relay, IMAP, keys, passwords) that cannot be read or is unusable."""
    import re

    from purlgate.channels.webhook_post import check_secret
    from purlgate.config import secret_refs
    from purlgate.pgp import check_passphrase

    problems = []
    for where, ref in secret_refs(config):
        try:
            secret = ref.reveal()
            if where.endswith("field pgp.passphrase"):
                check_passphrase(secret.decode("utf-8", "replace"))
            if re.search(r"field webhooks\.\d+\.secret$", where):
                check_secret(secret)
        except ConfigError as exc:
            problems.append(f"  {where}: {exc.message}")
    return problems


def _file_problems(config: Config) -> list[str]:
    """Templates that do not load and client key files that are not there."""
    from purlgate.web.templates import Template

    problems = []
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
        problems += _e2e_password_problems(client_id, client)
    return problems


def _e2e_password_problems(client_id: str, client: Any) -> list[str]:
    """An SFTP e2e_password that the account's password_hash does not accept."""
    from purlgate.passwords import verify_password

    account = client.sftp
    if account is None or account.e2e_password is None or account.password_hash is None:
        return []
    try:
        password = account.e2e_password.reveal().decode("utf-8", "replace")
    except ConfigError:
        return []  # reported with every unreadable secret
    if verify_password(password, account.password_hash):
        return []
    return [f"  client {client_id}, field sftp.e2e_password: the account's password_hash "
            "does not accept it"]


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


def hash_password(args: argparse.Namespace) -> int:
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


def webhook_secret(args: argparse.Namespace) -> int:
    import base64
    import secrets

    # As Standard Webhooks secrets are: the prefix, then the base64 of random bytes.
    print("whsec_" + base64.b64encode(secrets.token_bytes(32)).decode())
    return EXIT_OK
