"""The batch pipeline: one received file in, a PURL file (+ flag, + error file) out.

    intake (client, name rule, project, duplicate claim)
      -> unwrap (PGP, then ZIP) -> head (encoding, header, delimiter, columns)
      -> rows (stream) -> render (+ row store) -> PURL file (atomic) -> .flg -> error file

No sockets and no configuration reads: the caller passes the clients, the store, the
renderer factory, the row store, the clock and the subscribers. The work is blocking and CPU-bound;
async callers run ``process`` in a worker thread.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import logging
import shutil
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from purlgate.config import ClientConfig, ProjectConfig
from purlgate.core import dialect as dia
from purlgate.core.archive import UnwrapLimits, unwrap
from purlgate.core.crypto import Crypto, Decrypted, check_signature, looks_like_pgp
from purlgate.core.errorlog import ErrorLog
from purlgate.core.files import (
    RESULT_MODE,
    AtomicFile,
    clear_scratch,
    sweep_scratch,
    thread_scratch,
)
from purlgate.core.lifecycle import (
    EVENT_OF_STATE,
    TERMINAL,
    BatchEvent,
    BatchRecord,
    BatchState,
    BatchStore,
    Counts,
    EventKind,
)
from purlgate.core.naming import (
    DataName,
    client_from_name,
    error_name,
    flag_name,
    parse_data_name,
    purl_name,
    select_project,
    strip_pgp,
)
from purlgate.core.render import Renderer, RowStore
from purlgate.core.transform import Target, transform
from purlgate.errors import (
    ClientInputError,
    EncodingError,
    FileNameError,
    InvalidUtf8Error,
    PgpError,
    PurlgateError,
    ServerError,
    StorageError,
    is_storage_fault,
)
from purlgate.faults import crash_point

log = logging.getLogger("purlgate.core")

Progress = Callable[[int, int], None]
Subscriber = Callable[[BatchEvent], None]
RendererFactory = Callable[[str, str], Renderer]
# Said to a client whatever is configured, so it promises no alert (serve sends one to
# relay.operator when there is one: see channels/alerts.OPERATOR_CODES).
INTERNAL_REASON = ("an error on our side stopped the batch, not a problem with your file; "
                   "please send it again later")


@dataclass(frozen=True)
class Submission:
    """A received file, already safe on our disk."""

    path: Path
    received_name: str  # the name the client gave it
    channel: str  # "cli", "smtp", "imap", "sftp"
    client_id: str | None = None  # known when the channel authenticated the client
    project_id: str | None = None  # known when the channel implies it (SFTP folder)
    zip_password: bytes | None = None
    require_aes: bool = False
    sha256: str | None = None  # computed here when the channel did not
    # The channel's durable id of this file (its spool entry). A second call with the
    # same id returns the first outcome, or restarts the batch a crash interrupted.
    intake_id: str | None = None
    # False: the channel delivers no flag file whatever the project says (email: the
    # reply itself says the PURL file is complete), so none is written.
    flag_file: bool = True
    # The audit trail, in the channel's words: where it came from (an address, a host)
    # and what the mail's sender checks said.
    source: str | None = None
    sender_auth: str | None = None


@dataclass(frozen=True)
class BatchOutcome:
    batch: BatchRecord
    purl: Path | None = None
    flag: Path | None = None
    errors: Path | None = None
    error: PurlgateError | None = None

    @property
    def state(self) -> BatchState:
        return self.batch.state


@dataclass
class _Job:
    """What one batch run carries from step to step, once its name is claimed."""

    batch_id: int
    owner: tuple[str, str]  # the client's id and the project's
    client: ClientConfig
    path: Path  # the data file (decrypted, unwrapped)
    data: DataName
    project: ProjectConfig
    renderer: Renderer
    out_dir: Path
    work: Path  # the batch's scratch folder
    errors: ErrorLog
    progress: Progress | None
    restarted: bool = False  # a crash interrupted this batch: its own outputs may exist
    flag_file: bool = True  # the channel delivers one (if the project has one)
    signer: str | None = None  # the fingerprint of a valid PGP signature

    @property
    def encrypt(self) -> bool:
        return self.project.pgp_encrypt_output

    @property
    def purl_path(self) -> Path:
        p = self.project
        return self.out_dir / purl_name(self.data, p.purl_prefix, p.purl_suffix,
                                        encrypted=self.encrypt)

    @property
    def error_path(self) -> Path:
        p = self.project
        return self.out_dir / error_name(self.data, p.purl_prefix, p.purl_suffix,
                                         encrypted=self.encrypt)


def _kept_scratch(name: str) -> bool:
    """The scratch files every batch makes (see ``clear_scratch``)."""
    return name.startswith("unwrapped.") or name == "row-errors.csv"


def _hash_file(path: Path, into: dict[str, str]) -> None:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)  # releases the GIL: runs beside the parser
    into["sha256"] = digest.hexdigest()


class BatchProcessor:
    """Runs batches for one region. Thread-safe: each call works on its own batch."""

    def __init__(
        self,
        *,
        region_id: str,
        clients: Mapping[str, ClientConfig],
        limits: UnwrapLimits,
        store: BatchStore,
        renderer_for: RendererFactory,
        clock: Callable[[], datetime],
        work_root: Path,
        subscribers: Sequence[Subscriber] = (),
        crypto: Crypto | None = None,
        rows: RowStore | None = None,
        result_mode: int = RESULT_MODE,
    ) -> None:
        self.region_id = region_id
        self.result_mode = result_mode  # PURL, flag and error files
        self.rows = rows
        self.crypto = crypto
        self.clients = clients
        self.limits = limits
        self.store = store
        self.renderer_for = renderer_for
        self.clock = clock
        self.work_root = work_root
        self.subscribers = list(subscribers)
        self._hashing = threading.local()  # the received file being hashed, per batch
        if work_root.is_dir():
            # Scratch of processes that are gone, and the per-batch folders of the
            # previous release: a batch cut off there starts again from scratch anyway.
            sweep_scratch(work_root)
            for legacy in work_root.glob("batch-*"):
                shutil.rmtree(legacy, ignore_errors=True)

    # -- intake -------------------------------------------------------------------

    def resolve_client(self, submission: Submission) -> str:
        """The client a submission belongs to: the channel's word, else the file name."""
        if submission.client_id is not None:
            if submission.client_id not in self.clients:
                raise FileNameError(f"unknown client {submission.client_id!r}")
            return submission.client_id
        client_id = client_from_name(submission.received_name, self.clients)
        if client_id is not None:
            return client_id
        raise FileNameError(
            f"cannot tell which client {submission.received_name!r} is for; name it "
            "<client>_<project>_YYYYMMdd_HHMMss_mm.<ext> or name the client explicitly"
        )

    def select_project(self, client_id: str, wanted: str | None, data: DataName) -> str:
        return select_project(self.clients, client_id, wanted, data)

    # -- events -------------------------------------------------------------------

    def _move(
        self, batch_id: int, target: BatchState, *, reason: str | None = None,
        error_code: str | None = None, counts: Counts | None = None,
        outputs: tuple[str, ...] = (), purl_sha256: str | None = None,
        signer: str | None = None,
    ) -> BatchRecord:
        if target in TERMINAL:
            self._settle_received(batch_id)  # the end's record and events carry it
        record = self.store.transition(
            batch_id, target, at=self.clock(), reason=reason, error_code=error_code,
            counts=counts, outputs=outputs, purl_sha256=purl_sha256, signer=signer,
        )
        if target in TERMINAL:
            crash_point("batch-ended")  # recorded; its events not yet published
        facts = _facts(record)
        if target in TERMINAL:
            seconds = (record.updated_at - record.created_at).total_seconds()
            log.info(
                "batch %d finished %s: client=%s project=%s channel=%s file=%s rows=%d "
                "ok=%d errors=%d seconds=%.2f%s",
                record.id, record.state, record.client, record.project, record.channel,
                record.data_name or record.received_name, record.counts.rows_total,
                record.counts.rows_ok, record.counts.rows_error, seconds,
                f" code={record.error_code}" if record.error_code else "",
                extra={"facts": {**facts, "event": "batch-finished",
                                 "seconds": round(seconds, 3)}},
            )
        else:
            log.info("batch %d %s: client=%s project=%s", record.id, record.state,
                     record.client, record.project,
                     extra={"facts": {**facts, "event": "batch-state"}})
        self.publish(BatchEvent(EVENT_OF_STATE[target], record))
        return record

    def publish(self, event: BatchEvent) -> None:
        """Hand ``event`` to every subscriber (notifications, webhooks, the web side)."""
        for subscriber in self.subscribers:
            try:
                subscriber(event)
            except Exception:  # a notifier failing must not fail the batch
                log.exception("subscriber failed on %s of batch %d", event.kind,
                              event.batch.id)

    # -- the batch ----------------------------------------------------------------

    def process(
        self, submission: Submission, out_dir: Path, progress: Progress | None = None
    ) -> BatchOutcome:
        """Run one batch to a terminal state. Client mistakes become a Failed outcome."""
        client_id = self.resolve_client(submission)
        opened = self._open(submission, client_id, out_dir)
        if isinstance(opened, BatchOutcome):
            return opened  # this intake's batch ended before: its recorded outcome
        record, restarted = opened
        if submission.sha256 is None:
            # Hashed beside the parser; recorded before the batch ends (see _move).
            digest: dict[str, str] = {}
            hasher = threading.Thread(
                target=_hash_file, args=(submission.path, digest), daemon=True
            )
            hasher.start()
            self._hashing.pending = (hasher, digest)
        work = thread_scratch(self.work_root)
        clear_scratch(work, _kept_scratch)  # what a batch cut off on this thread left
        errors = ErrorLog(work / "row-errors.csv")
        job: _Job | None = None
        try:
            job = self._prepare(submission, client_id, record, work=work, errors=errors,
                                out_dir=out_dir, progress=progress, restarted=restarted)
            return self._run(job)
        except ClientInputError as exc:
            return self._refused(record, exc, errors, job)
        except (ServerError, OSError) as exc:
            if submission.intake_id is not None and is_storage_fault(exc):
                # A channel's spool keeps the file and tries again once the disk is
                # back; this batch then resumes. Failing it would tell the client to
                # resend a file we hold.
                log.warning("batch %d paused by a storage fault: %s", record.id,
                            getattr(exc, "message", None) or exc)
                raise
            return self._stopped(record, exc)
        finally:
            errors.close()
            clear_scratch(work, _kept_scratch)
            self._settle_received(record.id)

    def _settle_received(self, batch_id: int) -> None:
        """Record the received file's SHA-256 that this thread's batch is hashing (a
        no-op when the channel gave it, or it is recorded already)."""
        pending = getattr(self._hashing, "pending", None)
        if pending is None:
            return
        self._hashing.pending = None
        hasher, digest = pending
        hasher.join()
        if "sha256" in digest:
            self.store.set_sha256(batch_id, digest["sha256"])

    def _open(self, submission: Submission, client_id: str,
              out_dir: Path) -> tuple[BatchRecord, bool] | BatchOutcome:
        """The batch of this submission: a new one, or the one a crash interrupted
        (restarted: True), or, when it already ended, its recorded outcome."""
        previous = (self.store.find_by_intake(submission.intake_id)
                    if submission.intake_id is not None else None)
        if previous is not None and previous.state in TERMINAL:
            log.info("batch %d already %s for intake %s", previous.id, previous.state,
                     submission.intake_id)
            # A crash may have come between its end and its events' delivery.
            self.publish(BatchEvent(EVENT_OF_STATE[previous.state], previous, again=True))
            return _recorded_outcome(previous, out_dir)
        if previous is not None:
            log.warning("batch %d restarts after an interruption", previous.id)
            self.publish(BatchEvent(EventKind.RECEIVED, previous, again=True))
            if previous.state is BatchState.IN_PROGRESS:
                return self.store.transition(previous.id, BatchState.INITIALIZING,
                                             at=self.clock(), reason="restarted"), True
            return previous, True
        record = self.store.create(
            region=self.region_id, client=client_id, project=submission.project_id,
            channel=submission.channel, received_name=submission.received_name,
            sha256=submission.sha256, at=self.clock(), intake_id=submission.intake_id,
            source=submission.source, sender_auth=submission.sender_auth,
        )
        log.info("batch %d received: client=%s channel=%s file=%s", record.id, client_id,
                 submission.channel, submission.received_name,
                 extra={"facts": {**_facts(record), "event": "batch-received"}})
        self.publish(BatchEvent(EventKind.RECEIVED, record))
        return record, False

    def _prepare(self, submission: Submission, client_id: str, record: BatchRecord, *,
                 work: Path, errors: ErrorLog, out_dir: Path, progress: Progress | None,
                 restarted: bool) -> _Job:
        """Decrypt -> unwrap -> name -> claim: the data file, its project, and the name
        held for this batch. Nothing is claimed for a file that is not authentic."""
        source, name, decrypted = self.decrypt_submission(submission, work)
        unwrapped = unwrap(
            source, name, work,
            password=submission.zip_password, require_aes=submission.require_aes,
            limits=self.limits,
        )
        data = parse_data_name(
            unwrapped.data_name,
            from_pgp=decrypted is not None and not unwrapped.from_archive,
        )
        project_id = self.select_project(client_id, submission.project_id, data)
        client = self.clients[client_id]
        project = client.projects[project_id]
        # Before the claim: a file that is not authentic must not take the name.
        check_signature(decrypted or Decrypted(None), pinned=client.pgp_fingerprint,
                        required=project.pgp_require_signature)
        if project.pgp_encrypt_output and self.crypto is not None \
                and client.pgp_fingerprint is not None:
            # Not after the whole file was processed: before anything is.
            self.crypto.check_recipient(client.pgp_fingerprint)
        self.store.claim_name(record.id, project=project_id, data_name=data.name)
        return _Job(
            batch_id=record.id, owner=(client_id, project_id), client=client,
            path=unwrapped.path, data=data,
            project=project, renderer=self.renderer_for(client_id, project_id),
            out_dir=out_dir, work=work, errors=errors, progress=progress,
            restarted=restarted, flag_file=submission.flag_file,
            signer=decrypted.signer if decrypted is not None else None,
        )

    def _refused(self, record: BatchRecord, exc: ClientInputError, errors: ErrorLog,
                 job: _Job | None) -> BatchOutcome:
        """The client's file is wrong: the batch fails with what to fix (and its error
        file, when it got as far as holding its name)."""
        log.info("batch %d refused: %s: %s", record.id, exc.code, exc.message)
        published = None
        if job is not None and job.project.error_file:
            # Only a batch that holds the name claim may write files named after it.
            errors.batch_errors.append(exc.message)
            published = self._publish_errors(job)
        self._drop_rows(record.id)
        failed = self._move(
            record.id, BatchState.FAILED, reason=exc.message, error_code=exc.code,
            counts=Counts(errors.rows_with_errors, 0, errors.rows_with_errors),
            outputs=tuple(p.name for p in (published,) if p),
            signer=job.signer if job is not None else None,
        )
        return BatchOutcome(failed, errors=published, error=exc)

    def _stopped(self, record: BatchRecord, exc: ServerError | OSError) -> BatchOutcome:
        """Our side failed (not a storage fault a spool will retry): the batch fails with
        the generic sentence, or the error's own words for the client."""
        log.exception("batch %d stopped by a server-side error", record.id)
        error = exc if isinstance(exc, ServerError) else StorageError(INTERNAL_REASON)
        self._drop_rows(record.id)
        failed = self._move(record.id, BatchState.FAILED,
                            reason=error.client_reason or INTERNAL_REASON,
                            error_code=error.code)
        return BatchOutcome(failed, error=error)

    def _drop_rows(self, batch_id: int) -> None:
        """A failed batch serves no links: its row data (if published) goes."""
        if self.rows is not None:
            self.rows.delete(batch_id)

    def read_head(self, path: Path, project: ProjectConfig,
                   encoding: str | None) -> tuple[dia.Dialect, dia.ColumnPlan]:
        with path.open("rb") as f:
            head = f.read(dia.HEAD_BYTES)
            at_eof = not f.read(1)
        rules = [dia.ColumnRule(c.name, c.required) for c in project.columns]
        dialect = dia.sniff(
            head, at_eof=at_eof, rules=rules,
            fixed_encoding=encoding or project.encoding,
            fixed_delimiter=project.delimiter,
            default_delimiter="\t" if path.suffix.lower() == ".tsv" else ",",
        )
        if dialect.encoding == "windows-1252":
            _check_cp1252(path)
        plan = dia.plan_columns(dialect.header, rules, project.keep_all_columns)
        return dialect, plan

    def decrypt_submission(
        self, submission: Submission, work: Path
    ) -> tuple[Path, str, Decrypted | None]:
        """Decrypt a PGP file (by extension or content); return what to unwrap next."""
        name = submission.received_name
        if not looks_like_pgp(submission.path, name):
            return submission.path, name, None
        if self.crypto is None:
            raise PgpError(
                "encrypted files are not set up for this region; send the file without PGP "
                "encryption, or ask us to set up PGP for you"
            )
        target = work / "decrypted"
        result = self.crypto.decrypt(submission.path, target)
        return target, strip_pgp(name)[0], result

    def _encrypt_to(self, source: Path, final: Path, job: _Job, *,
                    replace: bool = False) -> Path:
        return self.encrypt_file(source, final, job.client.pgp_fingerprint,
                                  replace=job.restarted or replace)

    def encrypt_file(self, source: Path, final: Path, recipient: str | None, *,
                     replace: bool) -> Path:
        """``source`` encrypted to ``recipient`` (PGP) as the result file ``final``."""
        if self.crypto is None or recipient is None:
            raise ServerError("the project encrypts its results but PGP is not set up")
        with AtomicFile(final, no_clobber=not replace, mode=self.result_mode) as out:
            self.crypto.encrypt(source, out.file, recipient=recipient)
            return out.commit()

    def _publish_errors(self, job: _Job) -> Path:
        # An error file of this name can only be an earlier failed batch's (a batch that
        # delivered holds the name): the newer list replaces it.
        if not job.encrypt:
            return job.errors.publish(job.error_path, replace=True, mode=self.result_mode)
        plain = job.errors.publish(job.work / "errors-plain.csv", mode=0o600)
        return self._encrypt_to(plain, job.error_path, job, replace=True)

    def _run(self, job: _Job) -> BatchOutcome:
        project, errors = job.project, job.errors
        encoding = None
        if job.renderer.paid and project.encoding is None and not _all_utf8(job.path):
            # Settle the encoding before the first paid render: a file is rendered once.
            encoding = "windows-1252"
        dialect, plan = self.read_head(job.path, project, encoding)
        self._move(job.batch_id, BatchState.IN_PROGRESS)
        # Encrypted results: the plain PURL file only ever exists in the scratch folder.
        # The PURL file's SHA-256 (for the client to check) is taken as it is written, on
        # the writer's thread: re-reading 200 MB after a 1M-row batch cost 0.1 s.
        target = Target(path=job.work / "purl-plain" if job.encrypt else job.purl_path,
                        mode=0o600 if job.encrypt else self.result_mode,
                        replace=job.restarted, batch_id=job.batch_id, renderer=job.renderer,
                        rows=self.rows, owner=job.owner,
                        digest=None if job.encrypt else hashlib.sha256())
        try:
            counts = self._transform(job, dialect, plan, target)
        except InvalidUtf8Error as exc:
            if project.encoding is not None:
                raise EncodingError(
                    "the file is not valid UTF-8, the encoding agreed for this project; "
                    "save it as UTF-8 and send it again"
                ) from exc
            # The head was UTF-8 but the rest is not: it is a Windows-1252 file. The
            # partial output was discarded by AtomicFile; start again from the top.
            errors.reset()
            dialect, plan = self.read_head(job.path, project, "windows-1252")
            if target.digest is not None:
                target = dataclasses.replace(target, digest=hashlib.sha256())
            counts = self._transform(job, dialect, plan, target)
        purl = (self._encrypt_to(target.path, job.purl_path, job) if job.encrypt
                else target.path)
        outputs = [purl]
        flag = None
        if project.flag_file and job.flag_file:
            flag_path = purl.with_name(flag_name(purl.name))
            with AtomicFile(flag_path, no_clobber=not job.restarted,
                            mode=self.result_mode) as out:
                flag = out.commit()
            outputs.append(flag)
        errors_path = None
        if project.error_file and not errors.empty:
            errors_path = self._publish_errors(job)
            outputs.append(errors_path)
        state = BatchState.DONE_WITH_ERRORS if counts.rows_error else BatchState.DONE
        if target.digest is not None:
            purl_sha256 = target.digest.hexdigest()
        else:  # encrypted: the file the client gets is the ciphertext
            made: dict[str, str] = {}
            _hash_file(purl, made)
            purl_sha256 = made["sha256"]
        done = self._move(job.batch_id, state, counts=counts,
                          outputs=tuple(p.name for p in outputs),
                          purl_sha256=purl_sha256, signer=job.signer)
        return BatchOutcome(done, purl=purl, flag=flag, errors=errors_path)

    def _transform(self, job: _Job, dialect: dia.Dialect, plan: dia.ColumnPlan,
                   target: Target) -> Counts:
        return transform(job.path, dialect, plan, delimiter=job.project.output_delimiter,
                         encoding=job.project.output_encoding, target=target,
                         errors=job.errors, progress=job.progress)


def _facts(record: BatchRecord) -> dict[str, object]:
    """A batch's facts for a structured log line (``--log-format json``): no row data."""
    c = record.counts
    return {"batch": record.id, "client": record.client, "project": record.project,
            "channel": record.channel, "state": str(record.state), "rows": c.rows_total,
            "rows_ok": c.rows_ok, "errors": c.rows_error, "code": record.error_code}


def _recorded_outcome(batch: BatchRecord, out_dir: Path) -> BatchOutcome:
    """The outcome of a batch that already ended, from what the store recorded."""
    names = list(batch.outputs)
    flag = next((n for n in names if n.endswith(".flg")), None)
    errors = next((n for n in names if "_errors.csv" in n), None)
    purl = next((n for n in names if n not in (flag, errors)), None)
    return BatchOutcome(
        batch,
        purl=out_dir / purl if purl else None,
        flag=out_dir / flag if flag else None,
        errors=out_dir / errors if errors else None,
    )


def _all_utf8(path: Path) -> bool:
    """Whether the whole file decodes as UTF-8 (a streaming pass, flat memory)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _check_cp1252(path: Path) -> None:
    """Find a byte Windows-1252 does not define anywhere in the file, with its line."""
    lines = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            bad = dia.find_undefined_cp1252(chunk)
            if bad >= 0:
                raise dia.undefined_byte_error(chunk[bad], lines + chunk.count(b"\n", 0, bad) + 1)
            lines += chunk.count(b"\n")
