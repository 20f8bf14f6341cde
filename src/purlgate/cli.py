"""The command line: ``purlgate serve``, ``process`` and ``check-config``."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from purlgate import __version__
from purlgate.app import Gateway, build_gateway, serve
from purlgate.config import Config, load_config
from purlgate.core.archive import needs_password
from purlgate.core.lifecycle import BatchState
from purlgate.core.pipeline import Submission
from purlgate.errors import ConfigError, PurlgateError
from purlgate.passwords import hash_password
from purlgate.pgp import check_passphrase
from purlgate.region import build_region
from purlgate.replay import replay, table
from purlgate.web.templates import Template

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
PROGRESS_FROM_BYTES = 16 * 1024 * 1024


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="purlgate", description=__doc__)
    parser.add_argument("--version", action="version", version=f"purlgate {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log batch progress")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("process", help="run the batch core on a local data file")
    p.add_argument("file", type=Path, help="data file (.csv .tsv .txt .dat) or .zip")
    p.add_argument("--config", type=Path, help="regions.toml (default: the bundled one)")
    p.add_argument("--region", help="region (default: the client's first region)")
    p.add_argument("--client", help="client id (default: from the file name)")
    p.add_argument("--project", help="project id (default: from the file name)")
    p.add_argument("--out", type=Path, help="output folder (default: the file's folder)")
    p.add_argument("--data-dir", type=Path, help="state folder (default: the region's)")

    s = sub.add_parser("serve", help="run a region: SMTP listener, worker, outbox")
    s.add_argument("--region", required=True, help="the region this instance serves")
    s.add_argument("--config", type=Path, help="regions.toml (default: the bundled one)")
    s.add_argument("--data-dir", type=Path, help="state folder (default: the region's)")
    s.add_argument("--smtp-port", type=int, help="override the listener port (0: any free)")

    r = sub.add_parser("replay", help="QA: send fixture emails and check the replies")
    r.add_argument("files", type=Path, nargs="+", help="fixture .eml files")
    r.add_argument("--smtp", required=True, type=_host_port, help="the instance, HOST:PORT")
    r.add_argument("--capture", type=_host_port,
                   help="run an SMTP sink here (the instance's relay) and check replies")
    r.add_argument("--manifest", type=Path,
                   help="expected outcomes (default: manifest.toml beside the files)")
    r.add_argument("--region", help="only the fixtures of this region")
    r.add_argument("--timeout", type=float, default=60.0, help="seconds to wait per reply")

    sub.add_parser("hash-password",
                   help="read a password (prompt or stdin) and print its scrypt hash for "
                        "an SFTP account's password_hash")

    c = sub.add_parser("check-config", help="validate regions.toml and its secrets")
    c.add_argument("--config", type=Path, help="regions.toml (default: the bundled one)")
    return parser


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)


def _hash_password() -> int:
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
    manifest = args.manifest or args.files[0].parent / "manifest.toml"
    results = asyncio.run(replay(
        list(args.files), smtp=args.smtp, capture=args.capture, manifest=manifest,
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
    head = args.file.name.split("_", 1)[0].casefold()
    return next((cid for cid in config.clients if cid.casefold() == head), None)


def _process(args: argparse.Namespace) -> int:
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
    if client and client.zip_password and needs_password(path, path.name):
        password = client.zip_password.reveal()
    out_dir: Path = args.out or path.parent
    out_dir.mkdir(parents=True, exist_ok=True)

    size = path.stat().st_size
    bar: Any = None
    if size >= PROGRESS_FROM_BYTES:
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
        return EXIT_FAILED
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.region not in config.regions:
        raise ConfigError(f"no region {args.region!r}; configured: {', '.join(config.regions)}")
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
    config = load_config(args.config)
    problems = []
    for region_id, region in config.regions.items():
        if region.token_key is not None:
            try:
                region.token_key.reveal()
            except ConfigError as exc:
                problems.append(f"  region {region_id}, field token_key: {exc.message}")
        if region.pgp is not None:
            for field, ref in (("private_key", region.pgp.private_key),
                               ("passphrase", region.pgp.passphrase)):
                if ref is None:
                    continue
                try:
                    secret = ref.reveal()
                    if field == "passphrase":
                        check_passphrase(secret.decode("utf-8", "replace"))
                except ConfigError as exc:
                    problems.append(f"  region {region_id}, field pgp.{field}: {exc.message}")
        if region.storyboard is not None:
            try:
                region.storyboard.password.reveal()
            except ConfigError as exc:
                problems.append(f"  region {region_id}, field storyboard.password: "
                                f"{exc.message}")
    for client_id, client in config.clients.items():
        for project_id, project in client.projects.items():
            if project.render.template is not None:
                try:
                    Template(project.render.template)
                except ConfigError as exc:
                    problems.append(f"  client {client_id}, project {project_id}, field "
                                    f"render.template: {exc.message}")
        if client.zip_password is not None:
            try:
                client.zip_password.reveal()
            except ConfigError as exc:
                problems.append(f"  client {client_id}, field zip_password: {exc.message}")
        if client.pgp_public_key is not None and not client.pgp_public_key.is_file():
            problems.append(f"  client {client_id}, field pgp_public_key: no file "
                            f"{client.pgp_public_key}")
    if problems:
        raise ConfigError(f"{len(problems)} problem(s):\n" + "\n".join(problems))
    for region_id, region in config.regions.items():
        clients = config.clients_of(region_id)
        print(f"region {region_id}: {', '.join(region.inbound_addresses)}; "
              f"{len(clients)} client(s): "
              + ", ".join(f"{cid} ({', '.join(c.projects)})" for cid, c in clients.items()))
    print("configuration OK")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "process":
            return _process(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "replay":
            return _replay(args)
        if args.command == "hash-password":
            return _hash_password()
        return _check_config(args)
    except ConfigError as exc:
        print(f"purlgate: configuration error: {exc.message}", file=sys.stderr)
        return EXIT_USAGE
    except PurlgateError as exc:
        print(f"purlgate: {exc.message}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
