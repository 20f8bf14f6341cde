"""Validate-only: a file checked as a batch would check it, and nothing more.

The whole core up to rendering runs (decrypt, unwrap, name rule, project, signature,
encoding, delimiter, header against the agreed columns, required values, stray quotes,
every row), and the answer says "valid: N rows would be processed" or lists every
problem, with the error file in its usual format. Nothing is claimed (the name stays
free for the real file), rendered, kept in the row store or paid for: the rows go
through a renderer that makes no links, into a scratch file that is then removed. The
store keeps a record of kind "validation" (listed in the batch view, never counted as a
batch, never holding a name, sending no notification).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from purlgate.config import ProjectConfig
from purlgate.core.archive import unwrap
from purlgate.core.crypto import Decrypted, check_signature
from purlgate.core.errorlog import ErrorLog
from purlgate.core.files import clear_scratch, thread_scratch
from purlgate.core.lifecycle import BatchEvent, BatchRecord, BatchState, Counts, EventKind
from purlgate.core.naming import error_name, error_name_of_received, parse_data_name
from purlgate.core.render import RenderRequest, RenderResult
from purlgate.core.transform import Target, transform
from purlgate.errors import ClientInputError, InvalidUtf8Error

if TYPE_CHECKING:
    from purlgate.core.pipeline import BatchProcessor, Submission

log = logging.getLogger("purlgate.core")

KIND = "validation"
PREFIX = "validation_"  # of its error file, beside the results (never a batch's name)


class _NoLinks:
    """A renderer that makes no link and costs nothing: the rows are only checked."""

    keeps_rows = False
    paid = False

    def render(self, request: RenderRequest) -> RenderResult:
        empty = pa.repeat(pa.scalar("", pa.string()), request.num_rows)
        return RenderResult(thumbnails=empty, landing_pages=empty)


@dataclass(frozen=True)
class Validation:
    record: BatchRecord
    counts: Counts = field(default_factory=Counts)
    problem: str | None = None  # what makes the whole file unusable
    errors: Path | None = None  # the error file (in ``out_dir``), when there are errors
    name_held_since: str | None = None  # the real file's name is taken already (when)

    @property
    def valid(self) -> bool:
        return self.problem is None and not self.counts.rows_error

    def summary(self) -> str:
        """The report's first sentence."""
        c = self.counts
        if self.problem is not None:
            return f"not valid: {self.problem}"
        if c.rows_error:
            return (f"{c.rows_ok} of {c.rows_total} rows would be processed; "
                    f"{c.rows_error} have errors (see the error file)")
        return f"valid: {c.rows_ok} rows would be processed"


def validate(processor: BatchProcessor, submission: Submission, out_dir: Path) -> Validation:
    """Check ``submission`` as a batch would, make nothing (see the module docstring).
    A second call with the same intake id answers from the first one's record."""
    client_id = processor.resolve_client(submission)
    store = processor.store
    previous = (store.find_by_intake(submission.intake_id)
                if submission.intake_id is not None else None)
    record = previous or store.create(
        region=processor.region_id, client=client_id, project=submission.project_id,
        channel=submission.channel, received_name=submission.received_name,
        sha256=submission.sha256, at=processor.clock(), intake_id=submission.intake_id,
        kind=KIND, source=submission.source, sender_auth=submission.sender_auth)
    if record.state is BatchState.INITIALIZING:
        record = store.transition(record.id, BatchState.IN_PROGRESS, at=processor.clock())
    work = thread_scratch(processor.work_root)
    clear_scratch(work, lambda name: False)
    errors = ErrorLog(work / "validation-errors.csv")
    problem: str | None = None
    counts = Counts()
    error_file: str | None = None
    held: str | None = None
    try:
        try:
            counts, error_file, held = _check(processor, submission, client_id, work, errors)
        except ClientInputError as exc:
            problem = exc.message
            errors.batch_errors.append(exc.message)
            counts = Counts(errors.rows_with_errors, 0, errors.rows_with_errors)
        published = None
        if not errors.empty:
            project = _project_of(processor, client_id, submission)
            name = error_file or error_name_of_received(
                submission.received_name, project.purl_prefix if project else "PURL_",
                project.purl_suffix if project else "")
            published = errors.publish(out_dir / f"{PREFIX}{name}", replace=True,
                                       mode=processor.result_mode)
    finally:
        errors.close()
        clear_scratch(work, lambda name: False)
    state = (BatchState.FAILED if problem is not None else
             BatchState.DONE_WITH_ERRORS if counts.rows_error else BatchState.DONE)
    if record.state is BatchState.IN_PROGRESS:
        record = store.transition(record.id, state, at=processor.clock(), reason=problem,
                                  counts=counts, error_code=None if problem is None else
                                  "validation",
                                  outputs=(published.name,) if published else ())
    outcome = Validation(record, counts, problem, published, held)
    processor.publish(BatchEvent(EventKind.VALIDATED, record))  # a webhook's, no mail
    log.info("validation %d: client=%s file=%s %s", record.id, client_id,
             submission.received_name, outcome.summary(),
             extra={"facts": {"event": "validation-finished", "batch": record.id,
                              "client": client_id, "project": record.project,
                              "channel": record.channel, "rows": counts.rows_total,
                              "rows_ok": counts.rows_ok, "errors": counts.rows_error}})
    return outcome


def _project_of(processor: BatchProcessor, client_id: str,
                submission: Submission) -> ProjectConfig | None:
    client = processor.clients[client_id]
    project_id = submission.project_id or next(iter(client.projects), None)
    return client.projects.get(project_id) if project_id else None


def _check(processor: BatchProcessor, submission: Submission, client_id: str, work: Path,
           errors: ErrorLog) -> tuple[Counts, str, str | None]:
    """(counts, the usual error file name, when the name was taken) or a
    ClientInputError for the whole file."""
    source, name, decrypted = processor.decrypt_submission(submission, work)
    unwrapped = unwrap(source, name, work, password=submission.zip_password,
                       require_aes=submission.require_aes, limits=processor.limits)
    data = parse_data_name(unwrapped.data_name,
                           from_pgp=decrypted is not None and not unwrapped.from_archive)
    project_id = processor.select_project(client_id, submission.project_id, data)
    client = processor.clients[client_id]
    project = client.projects[project_id]
    check_signature(decrypted or Decrypted(None), pinned=client.pgp_fingerprint,
                    required=project.pgp_require_signature)
    taken = processor.store.held_since(client_id, project_id, data.name)
    held = taken.strftime("%Y-%m-%d %H:%M:%S UTC") if taken is not None else None
    target = Target(path=work / "validation-purl", mode=0o600, replace=True, batch_id=0,
                    renderer=_NoLinks(), rows=None)
    dialect, plan = processor.read_head(unwrapped.path, project, None)
    try:
        counts = transform(unwrapped.path, dialect, plan, delimiter=project.output_delimiter,
                           encoding=project.output_encoding, target=target, errors=errors,
                           progress=None)
    except InvalidUtf8Error:
        if project.encoding is not None:
            raise
        errors.reset()
        dialect, plan = processor.read_head(unwrapped.path, project, "windows-1252")
        counts = transform(unwrapped.path, dialect, plan, delimiter=project.output_delimiter,
                           encoding=project.output_encoding, target=target, errors=errors,
                           progress=None)
    finally:
        target.path.unlink(missing_ok=True)
    name = error_name(data, project.purl_prefix, project.purl_suffix)
    return counts, name, held


def describe(outcome: Validation) -> str:
    """The report's text, for a reply or a note in Downloads: every problem, or that the
    file is valid; never row data."""
    lines = [outcome.summary() + "."]
    c = outcome.counts
    if outcome.problem is None:
        lines.append(f"Rows read: {c.rows_total}; without errors: {c.rows_ok}; "
                     f"with errors: {c.rows_error}.")
    if outcome.errors is not None:
        lines.append(f"The error file {outcome.errors.name} lists every problem "
                     "(row, column, reason).")
    if outcome.name_held_since is not None:
        lines.append(f"Note: a file of this name was already received at "
                     f"{outcome.name_held_since}; send the real file under a new name.")
    lines.append("This was a validation only: nothing was processed, rendered or kept, "
                 "and it took no file name.")
    return "\n".join(lines) + "\n"
