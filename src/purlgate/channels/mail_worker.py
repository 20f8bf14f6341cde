"""From a spooled message to a queued reply, once per message.

For each spool entry: find the one ZIP, hand it to the batch core (AES required, the
client's password), queue the reply (keyed by the spool id), then drop the entry. A
crash anywhere repeats the entry after restart; the core returns the batch it already
ran for that spool id, and the outbox ignores a reply key it already has: one PURL
file, one reply. The same message delivered twice (same Message-ID and attachment
sha256, by SMTP twice or SMTP and IMAP) is processed once: the ledger remembers which
spool entry owns it.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import threading
import time
from collections.abc import Mapping
from contextlib import closing
from email.message import EmailMessage
from pathlib import Path
from typing import Protocol

from purlgate.channels.alerts import OperatorAlerts
from purlgate.channels.mail_message import (
    Attachment,
    addresses,
    inbound_of,
    message_id,
    raw_headers,
    read_headers,
    zip_attachment,
)
from purlgate.channels.outbox import Outbox
from purlgate.channels.queue_worker import QueueWorker
from purlgate.channels.replies import (
    Reply,
    failure_reply,
    fault_reply,
    success_reply,
    validation_reply,
)
from purlgate.channels.sender_policy import Checks, Refusal, Verdicts, decide
from purlgate.channels.spool import Spool, SpoolEntry
from purlgate.channels.too_big import TooBigForMail
from purlgate.config import ClientConfig, RegionConfig, client_of_sender
from purlgate.core.files import clear_scratch, retire, sweep_scratch, thread_scratch
from purlgate.core.lifecycle import BatchEvent, BatchState
from purlgate.core.pipeline import BatchProcessor, Submission, Subscriber
from purlgate.core.validation import describe, validate
from purlgate.errors import ConfigError, DamagedEntryError, MessageError
from purlgate.faults import crash_point

log = logging.getLogger("purlgate.mail")


# Kept between messages: the attachment and reply ZIP (emptied), the outputs folder
# a message lets go of (see _let_go).
SCRATCH_FILES = ("attachment", "reply.zip", "out")


class MailLedger:
    """Which spool entry owns a message (Message-ID + attachment sha256)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        with closing(sqlite3.connect(path)) as db, db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS deliveries (key TEXT PRIMARY KEY,"
                       " intake_id TEXT NOT NULL)")

    def claim(self, key: str, intake_id: str) -> str:
        """The owner of ``key``: ``intake_id`` if it is the first to ask."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:  # one connection per thread, kept (opening one costs a schema read)
            db = self._local.db = sqlite3.connect(self.path, timeout=30)
            db.execute("PRAGMA synchronous=FULL")
        with db:
            db.execute("INSERT OR IGNORE INTO deliveries (key, intake_id) VALUES (?, ?)",
                       (key, intake_id))
            row = db.execute("SELECT intake_id FROM deliveries WHERE key = ?",
                             (key,)).fetchone()
        return str(row[0])


class Ledger(Protocol):
    """The mail ledger: ``MailLedger`` here, ``postgres.PgMailLedger`` region-wide."""

    def claim(self, key: str, intake_id: str) -> str: ...


class Elsewhere(Protocol):
    """Where entries are handled when not in this process (``mail_process.py``)."""

    def warm(self) -> None: ...

    async def handle(self, entry: SpoolEntry) -> tuple[list[BatchEvent], list[str]]:
        """Handle ``entry``; its batch events and the outbox ids it queued."""
        ...

    def close(self) -> None: ...


class MailWorker:
    def __init__(self, *, region: RegionConfig, clients: Mapping[str, ClientConfig],
                 processor: BatchProcessor, spool: Spool, outbox: Outbox, ledger: Ledger,
                 work_root: Path, alerts: OperatorAlerts | None = None,
                 processes: Elsewhere | None = None,
                 checks: Checks | None = None,
                 too_big: TooBigForMail | None = None) -> None:
        self.region = region
        self.checks = checks
        self.too_big = too_big  # replies past the relay's limit: a download link instead
        self.clients = clients
        self.processor = processor
        self.spool = spool
        self.outbox = outbox
        self.ledger = ledger
        self.work_root = work_root
        work_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        sweep_scratch(work_root)  # of worker processes that are gone
        self.alerts = alerts
        self.processes = processes
        # Where the batch events of entries handled in worker processes go in this one.
        self.event_sinks: list[Subscriber] = []
        self._worker: QueueWorker[SpoolEntry] = QueueWorker(
            "mail", handle=self.handle, pending=spool.pending, ident=lambda entry: entry.id,
            fair_key=lambda entry: client_of_sender(str(entry.meta.get("mail_from", "")),
                                             self.clients),
            # With worker processes, one entry more per process waits in the pool's
            # queue: a process takes its next entry the moment it is done, without a
            # round trip through this (busy) event loop.
            workers=region.processing.workers * (2 if processes is not None else 1),
            max_attempts=region.processing.max_attempts,
            retry_seconds=region.processing.retry_seconds, on_dead=self.dead_letter,
            run=self._in_process if processes is not None else None)
        self.submit = self._worker.submit
        self.run = self._worker.run

    async def _in_process(self, entry: SpoolEntry) -> None:
        assert self.processes is not None
        try:
            events, queued = await self.processes.handle(entry)
        except BaseException:
            self.outbox.rescan()  # it may have queued something before it failed
            raise
        for event in events:
            for sink in self.event_sinks:
                sink(event)
        self.outbox.adopt(queued)  # the worker process queued them in the shared folder

    def warm(self) -> None:
        """Prepare the worker processes (if any) before the first message."""
        if self.processes is not None:
            self.processes.warm()

    def close(self) -> None:
        if self.processes is not None:
            self.processes.close()

    @property
    def queue(self) -> QueueWorker[SpoolEntry]:
        return self._worker

    @staticmethod
    def reply_key(entry: SpoolEntry) -> str:
        """One answer per entry; one more each time an operator requeues it."""
        again = int(entry.meta.get("requeued", 0))
        return f"reply-{entry.id}" + (f"-r{again}" if again else "")

    def _reply_from(self, entry: SpoolEntry) -> str:
        inbound = [a.lower() for a in self.region.inbound_addresses]
        to = [r for r in entry.meta.get("rcpt_tos", []) if inbound_of(r, inbound)]
        return to[0] if to else inbound[0]

    def _validate_only(self, entry: SpoolEntry) -> bool:
        """Sent to the validate sub-address (and to no plain inbound address)."""
        inbound = [a.lower() for a in self.region.inbound_addresses]
        found = [inbound_of(r, inbound) for r in entry.meta.get("rcpt_tos", [])]
        ours = [f for f in found if f is not None]
        return bool(ours) and all(validate for _, validate in ours)

    def handle(self, entry: SpoolEntry) -> None:
        if not entry.path.exists():
            return  # finished meanwhile (submitted twice)
        if entry.meta.get("damaged"):
            raise DamagedEntryError(f"spool entry {entry.id} has a damaged envelope line")
        sender = str(entry.meta.get("mail_from", "")).lower()
        client_id = client_of_sender(sender, self.clients)
        if client_id is None:  # cannot happen for SMTP/IMAP intake; never reply
            log.warning("spool entry %s has no known sender; dropped without reply", entry.id)
            self.spool.finish(entry)
            return
        offset = entry.body_offset
        # The attachment and the reply's ZIP: this thread's scratch, emptied after each
        # message. The client's file name never becomes a path on our disk.
        scratch = thread_scratch(self.work_root)
        work = self.work_root / entry.id
        try:
            # What this message's batch and answer queue (notifications, the reply) is
            # made durable by one folder fsync, before the spool entry goes.
            with self.outbox.one_commit():
                self._answer(entry, sender, client_id, offset, scratch=scratch, work=work)
            self.spool.finish(entry)
            _let_go(work, scratch)
        finally:
            clear_scratch(scratch, lambda name: name in SCRATCH_FILES)

    def _answer(self, entry: SpoolEntry, sender: str, client_id: str, offset: int, *,
                scratch: Path, work: Path) -> None:
        """Queue the one answer to ``entry`` (none for a message already answered).
        ``work`` keeps the batch's outputs until the reply is queued: after a crash the
        batch's recorded outcome is answered from them."""
        message = headers_of(entry.path, offset) or EmailMessage()
        ours = self._reply_from(entry)
        key = self.reply_key(entry)
        try:
            # Decoded to our disk as it is read: the message is never held in memory.
            _, found = zip_attachment(entry.path, scratch / "attachment", offset=offset)
            attachment: Attachment | None = found
            problem = None
        except MessageError as exc:
            attachment, problem = None, exc
        # One message, one answer: the same Message-ID and attachment again (SMTP twice,
        # SMTP and IMAP, an IMAP re-fetch after a crash) is dropped silently.
        digest = attachment.sha256 if attachment is not None else "no-zip"
        owner = self.ledger.claim(f"{message_id(message) or entry.id}|{digest}", entry.id)
        if owner != entry.id:
            log.info("spool entry %s repeats entry %s; processed once", entry.id, owner)
            return
        client = self.clients[client_id]
        verdicts = self._verdicts(entry, offset, sender)
        refusal = self._refused(entry, client, verdicts)
        if refusal is not None:
            problem = MessageError(f"who sent this message could not be confirmed: "
                                   f"{refusal.reason}. Nothing from it was processed")
            attachment = None
        if attachment is None:
            assert problem is not None
            self.outbox.enqueue(failure_reply(message, problem.message, sender=ours,
                                              to=sender).message,
                                sender=ours, recipients=[sender], key=key)
            return
        if client.zip_password is None:
            raise ConfigError(f"client {client_id} mails data files but has no zip_password")
        password = client.zip_password.reveal()
        if not work.is_dir():
            # The folder the last message let go of, else a new one.
            try:
                (scratch / "out").replace(work)
            except FileNotFoundError:
                work.mkdir(mode=0o700)
        submission = Submission(
            path=attachment.path, received_name=attachment.filename,
            channel=str(entry.meta.get("channel", "smtp")), client_id=client_id,
            zip_password=password, require_aes=True, sha256=attachment.sha256,
            intake_id=entry.id, flag_file=False, source=_source(entry, sender),
            sender_auth=verdicts.summary() if verdicts is not None else None)
        make = self._check_only if self._validate_only(entry) else self._processed
        reply = make(message, submission, work, password=password, sender=ours, to=sender,
                     scratch=scratch)
        self.outbox.enqueue(reply.message, sender=ours, recipients=[sender], key=key,
                            attachment=reply.attachment)

    def _verdicts(self, entry: SpoolEntry, offset: int, sender: str) -> Verdicts | None:
        """Who sent ``entry``, as checked here (SMTP) or as the trusted MTA or mailbox
        recorded it (IMAP, or behind a trusted MTA); None without checks."""
        if self.checks is None:
            return None
        try:
            if self.checks.trusts_headers or entry.meta.get("channel") == "imap":
                verdicts = self.checks.from_headers(raw_headers(entry.path, offset))
            else:
                with entry.path.open("rb") as f:  # read once, never held whole
                    f.seek(offset)
                    verdicts = self.checks.verify(f, ip=entry.meta.get("peer"),
                                                  helo=entry.meta.get("helo"),
                                                  mail_from=sender)
        except Exception:  # a check that breaks is recorded as such, never a pass
            log.exception("spool entry %s: the sender checks failed", entry.id)
            return Verdicts(self.checks.authserv_id, None, notes=("the checks failed",))
        log.info("spool entry %s from %s: %s", entry.id, sender, verdicts.summary(),
                 extra={"facts": {"event": "sender-checks", "dmarc": verdicts.dmarc,
                                  "spf": verdicts.spf}})
        return verdicts

    def _refused(self, entry: SpoolEntry, client: ClientConfig,
                 verdicts: Verdicts | None) -> Refusal | None:
        """The client's policy for mail that had no check before it was taken: the
        IMAP mailbox's (SMTP mail was checked before its 250)."""
        if verdicts is None or entry.meta.get("channel") != "imap":
            return None
        refusal = decide(client.sender_auth, verdicts)
        if refusal is not None:
            log.info("spool entry %s refused by the sender checks: %s", entry.id,
                     refusal.reason)
        return refusal

    def _processed(self, message: EmailMessage, submission: Submission, work: Path, *,
                   password: bytes, sender: str, to: str, scratch: Path) -> Reply:
        """The batch run, and the reply that says how it went."""
        outcome = self.processor.process(submission, work)
        batch = outcome.batch
        crash_point("purl-published")
        stash = self.too_big.stash(batch.id, batch.client) if self.too_big else None
        if batch.state is BatchState.FAILED or outcome.purl is None:
            return failure_reply(message, batch.reason or "the file could not be processed",
                                 sender=sender, to=to, batch=batch, errors=outcome.errors,
                                 password=password, scratch=scratch, stash=stash)
        files = [p for p in (outcome.purl, outcome.errors) if p is not None]
        return success_reply(message, batch, files, password, sender=sender, to=to,
                             scratch=scratch, stash=stash)

    def _check_only(self, message: EmailMessage, submission: Submission, work: Path, *,
                    password: bytes, sender: str, to: str, scratch: Path) -> Reply:
        """The answer to a message sent to the validate address: the file checked, never
        processed (core/validation.py)."""
        checked = validate(self.processor, submission, work)
        record = checked.record
        return validation_reply(message, describe(checked), checked.errors,
                                password=password, sender=sender, to=to, scratch=scratch,
                                stash=self.too_big.stash(record.id, record.client)
                                if self.too_big else None)

    def dead_letter(self, entry: SpoolEntry, exc: BaseException, attempts: int) -> None:
        """An entry that cannot be handled: the operator is alerted (at most once an hour
        for the same kind), the client is told, the entry waits in ``spool/dead``."""
        channel = str(entry.meta.get("channel", "smtp"))
        sender = str(entry.meta.get("mail_from", "")).lower()
        headers = headers_of(entry.path, entry.body_offset)
        if not sender and headers is not None:
            # A damaged envelope line: the From header was checked against the envelope
            # sender at intake, so a registered sender there still gets its answer.
            found = addresses(headers, "From")
            sender = found[0] if len(found) == 1 else ""
        client_id = client_of_sender(sender, self.clients) if sender else None
        region = self.processor.region_id
        alerted = self.alerts is not None and self.alerts.dead_letter(
            region=region, channel=channel, client=client_id, error=type(exc).__name__,
            entry_id=entry.id, attempts=attempts, what="message")
        if client_id is not None:
            ours = self._reply_from(entry)
            self.outbox.enqueue(
                fault_reply(headers, sender=ours, to=sender,
                            reference=entry.id, alerted=alerted),
                sender=ours, recipients=[sender], key=self.reply_key(entry))
        self.spool.dead_letter(entry, {
            "error": type(exc).__name__, "attempts": attempts, "channel": channel,
            "client": client_id, "alerted": alerted, "at": time.time()})
        shutil.rmtree(self.work_root / entry.id, ignore_errors=True)


def _source(entry: SpoolEntry, sender: str) -> str:
    """Where a message came from, for the audit trail: its sender and the address that
    delivered it (SMTP) or the mailbox (IMAP)."""
    if entry.meta.get("channel") == "imap":
        return f"{sender} via the IMAP mailbox"
    helo = entry.meta.get("helo")
    return f"{sender} from {entry.meta.get('peer') or '?'}" + (f" ({helo})" if helo else "")


def _let_go(work: Path, scratch: Path) -> None:
    """A message's outputs folder, once its reply is queued: the files (emptied) and the
    folder go to this thread's scratch for the next message to take over, rather than
    being deleted and made again (see core.files.clear_scratch for why)."""
    try:
        for path in list(work.iterdir()):
            if path.is_file() and not path.is_symlink():
                retire(path, scratch)
            else:
                shutil.rmtree(path, ignore_errors=True)
        work.replace(scratch / "out")
    except FileNotFoundError:
        pass  # nothing was made (a repeat, a message without a ZIP)
    except OSError:
        shutil.rmtree(work, ignore_errors=True)  # this thread keeps one already


def headers_of(path: Path, offset: int) -> EmailMessage | None:
    """The header block of a spooled message (to thread a reply), or None."""
    try:
        return read_headers(path, offset)
    except Exception:  # noqa: BLE001 - a reply without threading is still a reply
        return None
