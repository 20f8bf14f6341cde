"""purlgate's command line.

    serve            run a region: SMTP, IMAP, SFTP, the links' web side, the workers
    process          run the batch core on a local data file
    validate         check a data file as a batch would, and make nothing
    batches          the batch view in the terminal
    outbox           queued replies and notifications (like mailq)
    webhooks         queued, failed and stopped webhook deliveries, and requeue
    dead-letters     what could not be processed or delivered, and requeue
    e2e              the 20-row end-to-end check before a client's launch
    replay           QA: send fixture emails and check the replies
    check-config     validate regions.toml, its secrets, keys and templates
    hash-password    an SFTP account's password_hash
    webhook-secret   a new secret for a client's webhook endpoint
    healthcheck      exit 0 while the web side answers /healthz (containers)

Each command lives in a module of this package and imports what it needs when it runs
(the channels, the web side, Arrow), so that ``purlgate --help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence

from purlgate.cli.common import EXIT_FAILED, EXIT_USAGE
from purlgate.cli.parser import build_parser
from purlgate.errors import ConfigError, PurlgateError
from purlgate.logs import set_instance, setup_logging

# command -> (module, function): imported only for the command that runs.
COMMANDS = {
    "serve": ("purlgate.cli.run", "serve"),
    "process": ("purlgate.cli.run", "process"),
    "validate": ("purlgate.cli.run", "validate"),
    "check-config": ("purlgate.cli.run", "check_config"),
    "hash-password": ("purlgate.cli.run", "hash_password"),
    "webhook-secret": ("purlgate.cli.run", "webhook_secret"),
    "webhooks": ("purlgate.cli.ops", "webhooks"),
    "batches": ("purlgate.cli.ops", "batches"),
    "outbox": ("purlgate.cli.ops", "outbox"),
    "dead-letters": ("purlgate.cli.ops", "dead_letters"),
    "healthcheck": ("purlgate.cli.ops", "healthcheck"),
    "e2e": ("purlgate.cli.qa", "e2e"),
    "replay": ("purlgate.cli.qa", "replay"),
}


def _command(name: str) -> Callable[[argparse.Namespace], int]:
    module, function = COMMANDS[name]
    found: Callable[[argparse.Namespace], int] = getattr(importlib.import_module(module),
                                                         function)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    # What we create is ours alone unless a file says otherwise (results are 0640).
    os.umask(0o077)
    # We use no pydantic plugins; looking for them scans every installed package's
    # metadata (about 11 ms of each command's start).
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    args = build_parser().parse_args(argv)
    default = "INFO" if args.command == "serve" else "WARNING"
    if getattr(args, "instance", None):
        set_instance(args.instance)
    setup_logging(getattr(args, "log_level", default), getattr(args, "log_format", "text"))
    try:
        return _command(args.command)(args)
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
