"""QA's commands: the 20-row end-to-end check and the replay of fixture emails."""

# Imports inside the command functions are on purpose: each command imports what it
# needs when it runs, so that ``purlgate --help`` answers at once.
# ruff: noqa: PLC0415

from __future__ import annotations

import argparse
from pathlib import Path

from purlgate.cli.common import EXIT_FAILED, EXIT_OK
from purlgate.errors import ConfigError


def e2e(args: argparse.Namespace) -> int:
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
    account = config.clients[args.client].sftp if args.client in config.clients else None
    if password is None and args.sftp_key is None and account is not None \
            and account.e2e_password is not None:
        password = account.e2e_password.reveal().decode()  # the account's own, for QA
    target = default_target(
        region, smtp=args.smtp, capture=args.capture, sftp=args.sftp,
        sftp_password=password, sftp_key=args.sftp_key, links_base=args.links_base,
        insecure=args.insecure or None, timeout=args.timeout)
    checks = asyncio.run(run_e2e(config, args.region, args.client, args.project,
                                 channel=args.channel, target=target, data=args.file))
    print(report(checks))
    return EXIT_OK if all(c.ok for c in checks) else EXIT_FAILED


def replay(args: argparse.Namespace) -> int:
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
