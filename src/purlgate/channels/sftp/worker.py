"""Runs the batch core on spooled uploads; results land in the project's Downloads.

A batch that fails before the core could write its error file (a ZIP or PGP file
refused, say), and an upload dead-lettered for a fault on our side, still leave the
reason where results appear: the core's error file (its name, its encryption: a PGP
project only ever gets ``.gpg`` results).
"""

from __future__ import annotations

import logging
import shutil
import time

from purlgate.channels.alerts import OperatorAlerts
from purlgate.channels.queue_worker import QueueWorker
from purlgate.channels.sftp.service import VALIDATE, SftpService, held_as
from purlgate.channels.sftp.spool import Upload
from purlgate.config import ProcessingConfig
from purlgate.core.lifecycle import BatchState
from purlgate.core.notes import publish_result, write_error_note, write_note, write_refusal_note
from purlgate.core.pipeline import BatchProcessor, Submission
from purlgate.core.validation import describe, validate
from purlgate.errors import DamagedEntryError, ServerError

log = logging.getLogger("purlgate.sftp")


class SftpWorker:
    """Runs the batch core on spooled uploads; results land in the project's Downloads."""

    def __init__(self, service: SftpService, processor: BatchProcessor, *,
                 processing: ProcessingConfig | None = None,
                 alerts: OperatorAlerts | None = None) -> None:
        self.service = service
        self.processor = processor
        self.alerts = alerts
        processing = processing or ProcessingConfig()
        self._worker: QueueWorker[Upload] = QueueWorker(
            "sftp", handle=self.handle, pending=service.spool.pending,
            ident=lambda upload: upload.id,
            fair_key=lambda upload: upload.meta.get("client"),
            workers=processing.workers, max_attempts=processing.max_attempts,
            retry_seconds=processing.retry_seconds, on_dead=self.dead_letter)
        self.submit = self._worker.submit
        self.run = self._worker.run

    @property
    def queue(self) -> QueueWorker[Upload]:
        return self._worker

    def handle(self, upload: Upload) -> None:
        m = upload.meta
        if m.get("damaged"):
            raise DamagedEntryError(f"spool entry {upload.id} has no readable meta.json")
        downloads = self.service.downloads(m["client"], m["project"])
        client = self.service.clients[m["client"]]
        # The client's agreed ZIP password opens a password ZIP (or one inside PGP) here
        # too; without one, only plain ZIPs open.
        password = client.zip_password.reveal() if client.zip_password else None
        if m.get("validate"):
            self._validate(upload, password)
            return
        outcome = self.processor.process(
            Submission(path=upload.path, received_name=m["name"], channel="sftp",
                       client_id=m["client"], project_id=m["project"], intake_id=upload.id,
                       zip_password=password, source=m.get("source")),
            downloads,
        )
        if outcome.state is BatchState.FAILED and outcome.errors is None:
            # A failure before the batch could write its error file (a ZIP or PGP file
            # refused, say): the client still finds the reason where results appear.
            self._error_file(m["client"], m["project"], m["name"],
                             outcome.batch.reason or "the file could not be processed")
        self.service.spool.finish(upload)
        self.service.done(m["client"], m["project"], m["name"])

    def _validate(self, upload: Upload, password: bytes | None) -> None:
        """An upload to Validate: checked, never processed; the report
        (``<name>_validation.txt``) and the error file, if any, appear in Downloads."""
        m = upload.meta
        client, project, name = m["client"], m["project"], m["name"]
        scratch = upload.path.parent / ".validation"  # goes with the spool entry
        scratch.mkdir(exist_ok=True)
        try:
            checked = validate(self.processor, Submission(
                path=upload.path, received_name=name, channel="sftp", client_id=client,
                project_id=project, intake_id=upload.id, zip_password=password,
                source=m.get("source")), scratch)
            downloads = self.service.downloads(client, project)
            if checked.errors is not None:
                publish_result(self.processor, checked.errors, downloads / checked.errors.name,
                               client_id=client, project_id=project)
            write_note(self.processor, downloads, client_id=client, project_id=project,
                       name=f"{name}_validation.txt",
                       text=f"{name}, uploaded to Validate:\n{describe(checked)}")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        self.service.spool.finish(upload)
        self.service.done(client, project, held_as(VALIDATE, name))

    def dead_letter(self, upload: Upload, exc: BaseException, attempts: int) -> None:
        """An upload that cannot be processed: the operator is alerted, the client finds
        an error file in Downloads, and the upload waits in the dead-letter folder."""
        m = upload.meta
        client, project, name = m.get("client"), m.get("project"), m.get("name")
        region = self.processor.region_id
        alerted = self.alerts is not None and self.alerts.dead_letter(
            region=region, channel="sftp", client=client if isinstance(client, str) else None,
            error=type(exc).__name__, entry_id=upload.id, attempts=attempts, what="upload")
        if isinstance(client, str) and isinstance(project, str) and isinstance(name, str) \
                and client in self.service.clients \
                and project in self.service.clients[client].projects:
            told = ("our operators have been alerted and will process it once the fault is "
                    "fixed; the results will then appear here, so you need not upload it "
                    "again" if alerted else
                    "please upload it again later under a new name")
            self._error_file(client, project, name,
                             f"we could not process this file because of a fault on our "
                             f"side (reference {upload.id}); {told}")
            self.service.done(client, project,
                              held_as(VALIDATE, name) if m.get("validate") else name)
        self.service.spool.dead_letter(upload, {
            "error": type(exc).__name__, "attempts": attempts, "channel": "sftp",
            "client": client, "alerted": alerted, "at": time.time()})

    def note_refusal(self, client_id: str, project_id: str, name: str, reason: str) -> None:
        """An upload refused at open: why, in a note in Downloads (see
        ``core.notes.write_refusal_note``). Never fails the refusal itself."""
        try:
            write_refusal_note(self.processor, self.service.downloads(client_id, project_id),
                               client_id=client_id, project_id=project_id,
                               received_name=name, reason=reason)
        except Exception as exc:  # noqa: BLE001 - the status text still says why
            log.warning("no refusal note for an upload of client %s project %s (%s)",
                        client_id, project_id, type(exc).__name__)

    def _error_file(self, client_id: str, project_id: str, received: str,
                    reason: str) -> None:
        """The core's error file for ``received``, in the project's Downloads (none if
        the project has no error file; none at all rather than a plaintext one when a
        PGP project's key cannot be encrypted to)."""
        try:
            write_error_note(self.processor, self.service.downloads(client_id, project_id),
                             client_id=client_id, project_id=project_id,
                             received_name=received, reason=reason)
        except ServerError as exc:
            log.warning("no error file for an upload of client %s project %s: %s",
                        client_id, project_id, exc.message)
