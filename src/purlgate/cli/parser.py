"""The command line's grammar (argparse only: ``purlgate --help`` imports nothing else)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from purlgate import __version__
from purlgate.cli.common import env_path, host_port, port

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


def region_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--region", help="the region (default: the first one configured)")
    p.add_argument("--config", type=Path, help="regions.toml (default: the bundled one)")
    p.add_argument("--data-dir", type=Path, help="state folder (default: the region's)")


def build_parser() -> argparse.ArgumentParser:
    common = _logging_options()
    parser = argparse.ArgumentParser(prog="purlgate", description=DESCRIPTION,
                                     parents=[common])
    parser.add_argument("--version", action="version", version=f"purlgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_serve, _process, _validate, _replay, _hash_password, _webhook_secret,
                _batches, _outbox, _webhooks, _dead_letters, _e2e, _healthcheck,
                _check_config):
        add(sub, common)
    return parser


def _serve(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("serve", parents=[common],
                       help="run a region: SMTP, IMAP, SFTP, the links' web side, workers")
    s.add_argument("--region", default=os.environ.get("PURLGATE_REGION"),
                   required="PURLGATE_REGION" not in os.environ,
                   help="the region this instance serves (default: $PURLGATE_REGION)")
    s.add_argument("--config", type=Path, default=env_path("PURLGATE_CONFIG"),
                   help="regions.toml (default: $PURLGATE_CONFIG, else the bundled one)")
    s.add_argument("--data-dir", type=Path, help="state folder (default: the region's)")
    s.add_argument("--smtp-port", type=port, help="override the listener port (0: any free)")
    s.add_argument("--instance", default=os.environ.get("PURLGATE_INSTANCE"),
                   help="this instance's name in logs, leases and the batch view, unique "
                        "in its region (default: $PURLGATE_INSTANCE, else the host name)")


def _local_file(p: argparse.ArgumentParser, out_help: str) -> None:
    """The options of a command that runs the core on a local file."""
    p.add_argument("file", type=Path, help="data file (.csv .tsv .txt .dat), .zip or PGP")
    p.add_argument("--config", type=Path, help="regions.toml (default: the bundled one)")
    p.add_argument("--region", help="region (default: the client's first region)")
    p.add_argument("--client", help="client id (default: from the file name)")
    p.add_argument("--project", help="project id (default: from the file name)")
    p.add_argument("--out", type=Path, default=Path("out"), help=out_help)
    p.add_argument("--data-dir", type=Path, help="state folder (default: the region's)")


def _process(sub: Any, common: argparse.ArgumentParser) -> None:
    _local_file(sub.add_parser("process", parents=[common],
                               help="run the batch core on a local data file"),
                "output folder (default: ./out)")


def _validate(sub: Any, common: argparse.ArgumentParser) -> None:
    _local_file(sub.add_parser("validate", parents=[common],
                               help="check a data file as a batch would (nothing is "
                                    "processed, rendered, kept or claimed); exit 0 when "
                                    "valid"),
                "where the error file goes, if any (default: ./out)")


def _replay(sub: Any, common: argparse.ArgumentParser) -> None:
    r = sub.add_parser("replay", parents=[common],
                       help="QA: send fixture emails and check the replies")
    r.add_argument("files", type=Path, nargs="+",
                   help="fixture .eml files, or a folder of them")
    r.add_argument("--smtp", required=True, type=host_port, help="the instance, HOST:PORT")
    r.add_argument("--capture", type=host_port,
                   help="run an SMTP sink here (the instance's relay) and check replies")
    r.add_argument("--manifest", type=Path,
                   help="expected outcomes (default: manifest.toml beside the files)")
    r.add_argument("--region", help="only the fixtures of this region")
    r.add_argument("--timeout", type=float, default=60.0, help="seconds to wait per reply")


def _hash_password(sub: Any, common: argparse.ArgumentParser) -> None:
    sub.add_parser("hash-password", parents=[common],
                   help="read a password (prompt or stdin) and print its scrypt hash for "
                        "an SFTP account's password_hash")


def _webhook_secret(sub: Any, common: argparse.ArgumentParser) -> None:
    sub.add_parser("webhook-secret", parents=[common],
                   help="print a new webhook secret (whsec_ and 32 random bytes, base64), "
                        "for the client and for the endpoint's secret reference")


def _webhooks(sub: Any, common: argparse.ArgumentParser) -> None:
    w = sub.add_parser("webhooks", parents=[common],
                       help="queued, failed and stopped (410) webhook deliveries")
    region_options(w)
    act = w.add_mutually_exclusive_group()
    act.add_argument("--requeue", metavar="ID",
                     help="send a failed delivery again from scratch ('all': every one)")
    act.add_argument("--revive", metavar="URL",
                     help="deliver to an endpoint again after it answered 410 Gone")


def _batches(sub: Any, common: argparse.ArgumentParser) -> None:
    b = sub.add_parser("batches", parents=[common],
                       help="list a region's batches (newest first), like the batch view")
    region_options(b)
    b.add_argument("--client", help="only this client")
    b.add_argument("--project", help="only this project")
    b.add_argument("--status", help="only this status (e.g. Failed, 'Done with Errors')")
    b.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    b.add_argument("--json", action="store_true", help="JSON instead of a table")


def _outbox(sub: Any, common: argparse.ArgumentParser) -> None:
    o = sub.add_parser("outbox", parents=[common],
                       help="queued replies and notifications (like mailq)")
    region_options(o)
    act = o.add_mutually_exclusive_group()
    act.add_argument("--retry-now", metavar="ID", help="make a queued message due now")
    act.add_argument("--drop", metavar="ID", help="stop trying a message (moved to failed)")


def _dead_letters(sub: Any, common: argparse.ArgumentParser) -> None:
    d = sub.add_parser("dead-letters", parents=[common],
                       help="what could not be processed (spooled mail and uploads) or "
                            "delivered (outbox/failed), and re-queue")
    region_options(d)
    d.add_argument("--requeue", metavar="ID",
                   help="process a spool entry again, or send an outbox message again")


def _e2e(sub: Any, common: argparse.ArgumentParser) -> None:
    e = sub.add_parser("e2e", parents=[common],
                       help="the 20-row end-to-end check before a client's launch")
    e.add_argument("--region", required=True)
    e.add_argument("--client", required=True)
    e.add_argument("--project", required=True)
    e.add_argument("--channel", required=True, choices=("email", "sftp"))
    e.add_argument("--config", type=Path, default=env_path("PURLGATE_CONFIG"),
                   help="regions.toml (default: $PURLGATE_CONFIG, else the bundled one)")
    e.add_argument("--file", type=Path, help="send this file instead of 20 generated rows")
    e.add_argument("--smtp", type=host_port, help="the gateway's SMTP (default: config)")
    e.add_argument("--capture", type=host_port,
                   help="run the reply sink here, where the relay points (default: config)")
    e.add_argument("--sftp", type=host_port, help="the gateway's SFTP (default: config)")
    e.add_argument("--sftp-password-file", type=Path, help="the client's SFTP password")
    e.add_argument("--sftp-key", type=Path, help="the client's SSH private key")
    e.add_argument("--links-base", help="fetch the links here instead of public_base_url "
                                        "(e.g. https://127.0.0.1:8443)")
    e.add_argument("--insecure", action="store_true",
                   help="accept a self-signed certificate when fetching the links")
    e.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for results")


def _healthcheck(sub: Any, common: argparse.ArgumentParser) -> None:
    h = sub.add_parser("healthcheck", parents=[common],
                       help="exit 0 if the region's web side answers /healthz (containers)")
    h.add_argument("--region", default=os.environ.get("PURLGATE_REGION"),
                   help="the region (default: $PURLGATE_REGION, else the first one)")
    h.add_argument("--config", type=Path, default=env_path("PURLGATE_CONFIG"),
                   help="regions.toml (default: $PURLGATE_CONFIG, else the bundled one)")
    h.add_argument("--timeout", type=float, default=4.0, help="seconds to wait")


def _check_config(sub: Any, common: argparse.ArgumentParser) -> None:
    c = sub.add_parser("check-config", parents=[common],
                       help="validate regions.toml, its secrets, keys and templates")
    c.add_argument("--config", type=Path, help="regions.toml (default: the bundled one)")
