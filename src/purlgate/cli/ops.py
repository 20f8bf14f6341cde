"""Operators' commands on a region's state folder: batches, outbox, webhooks,
dead-letters, healthcheck. They read what a running gateway writes and never touch its temporary
files."""

# Imports inside the command functions are on purpose: each command imports what it
# needs when it runs, so that ``purlgate --help`` answers at once.
# ruff: noqa: PLC0415

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from purlgate.cli.common import EXIT_FAILED, EXIT_OK, region_dir
from purlgate.errors import ConfigError


def batches(args: argparse.Namespace) -> int:
    from purlgate.region import open_backend
    from purlgate.web.ops import batch_view, instances_view

    region_id, data_dir, config = region_dir(args)
    region = config.region(region_id)
    if region.database is None and not (data_dir / "batches.sqlite3").exists():
        print(f"purlgate: no batches yet in {data_dir} (region {region_id})", file=sys.stderr)
        return EXIT_OK
    backend = open_backend(region_id, region, data_dir)
    try:
        found = [batch_view(b) for b in backend.store.search(
            client=args.client, project=args.project, status=args.status, limit=args.limit)]
        instances = instances_view(backend.leases) if backend.shared else []
    finally:
        backend.close()
    if args.json:
        print(json.dumps({"region": region_id, "batches": found, "instances": instances},
                         indent=2))
        return EXIT_OK
    print(f"{'ID':>5}  {'STATUS':<16} {'CLIENT':<10} {'PROJECT':<10} {'CHANNEL':<7} "
          f"{'ROWS':>7} {'OK':>7} {'ERR':>5}  {'RECEIVED (UTC)':<19}  {'INSTANCE':<12} FILE")
    for b in found:
        print(f"{b['id']:>5}  {b['status']:<16} {b['client']:<10} {b['project'] or '-':<10} "
              f"{b['channel']:<7} {b['rows']:>7} {b['rows_ok']:>7} {b['rows_error']:>5}  "
              f"{b['received_at'][:19].replace('T', ' '):<19}  {b['instance'] or '-':<12} "
              f"{b['file']}{' (validation)' if b['kind'] == 'validation' else ''}")
    if not found:
        print("(no batches match)")
    if instances:
        print(f"\n{'INSTANCE':<20} {'LAST SEEN':>10} {'LEASES':>7}  WORKING ON")
        for i in instances:
            print(f"{i['name']:<20} {i['seen_seconds_ago']:>9.0f}s {len(i['leases']):>7}  "
                  f"{', '.join(f'{k}:{v}' for k, v in i['leases'][:4]) or '-'}")
    return EXIT_OK


def _outbox_of(args: argparse.Namespace) -> Any:
    from purlgate.channels.outbox import Outbox
    from purlgate.channels.relay_data import Outgoing

    _, data_dir, config = region_dir(args)
    region = config.regions[args.region or next(iter(config.regions))]

    async def never(message: Outgoing, sender: str, recipients: Sequence[str]) -> None:
        raise AssertionError("the outbox command never sends")

    return Outbox(data_dir / "outbox", region.relay, sender=never)


def outbox(args: argparse.Namespace) -> int:
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


def webhooks(args: argparse.Namespace) -> int:
    import time

    from purlgate.channels.webhooks import Webhooks
    from purlgate.config import origin

    region_id, data_dir, config = region_dir(args)
    hooks = Webhooks(data_dir / "webhooks", config.region(region_id).webhooks,
                     region=region_id, clients=config.clients_of(region_id))
    if args.revive:
        if not hooks.revive(args.revive):
            raise ConfigError(f"{args.revive} is not stopped; `purlgate webhooks` lists the "
                              "endpoints that answered 410 Gone")
        print(f"{origin(args.revive)}: deliveries start again (--requeue its failed ones "
              "to send them)")
        return EXIT_OK
    if args.requeue:
        ids = ([e.id for e in hooks.entries(hooks.failed)] if args.requeue == "all"
               else [args.requeue])
        try:
            for entry_id in ids:
                hooks.requeue(entry_id)
        except KeyError as exc:
            raise ConfigError(f"no failed webhook delivery {exc.args[0]!r}; `purlgate "
                              "webhooks` lists them") from exc
        print(f"{len(ids)} delivery(ies) queued again (a running gateway sends within 30 s)")
        return EXIT_OK
    now = time.time()
    for title, folder in (("QUEUED", hooks.queue), ("FAILED", hooks.failed)):
        found = hooks.entries(folder)
        print(f"{title + ' ID':<52} {'TYPE':<22} {'CLIENT':<10} {'TRIES':>5} {'AGE':>8}  "
              "ENDPOINT / LAST ERROR")
        for e in found:
            d = e.data
            print(f"{e.id:<52} {d['type']:<22} {d['client']:<10} {d['attempts']:>5} "
                  f"{now - d['created_at']:>7.0f}s  {origin(d['url'])}"
                  + (f" / {d['last_error']}" if d.get("last_error") else ""))
        print(f"-- {len(found)} {title.lower()}\n")
    for gone in hooks.gone_endpoints():
        print(f"STOPPED: {gone['url']} answered 410 Gone at {gone['at']}")
    return EXIT_OK


def dead_letters(args: argparse.Namespace) -> int:
    import time

    from purlgate.channels.sftp import SftpSpool
    from purlgate.channels.spool import Spool

    outbox = _outbox_of(args)
    _, data_dir, _ = region_dir(args)
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


def healthcheck(args: argparse.Namespace) -> int:
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

