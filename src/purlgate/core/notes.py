"""What a channel leaves where results appear when no batch wrote it: the reason a file
was refused at the door, or failed before its batch could list its errors, or was
dead-lettered. Named and encrypted as the batch's own results would be (a PGP project
only ever gets ``.gpg`` files), written atomically."""

from __future__ import annotations

import shutil
from pathlib import Path

from purlgate.core.errorlog import ErrorLog
from purlgate.core.files import AtomicFile, thread_scratch
from purlgate.core.naming import check_safe_name, error_name_of_received
from purlgate.core.pipeline import BatchProcessor
from purlgate.errors import FileNameError


def write_error_note(processor: BatchProcessor, out_dir: Path, *, client_id: str,
                     project_id: str, received_name: str, reason: str) -> Path | None:
    """An error file holding one batch-level ``reason`` for a file as received, for a
    channel that must leave the reason where results appear though no batch wrote
    one (it failed before, or was dead-lettered). Named and encrypted as the batch's
    own would be; None when the project has no error file. A ServerError when a PGP
    project's key cannot be encrypted to: never a plaintext file instead."""
    client = processor.clients[client_id]
    project = client.projects[project_id]
    if not project.error_file:
        return None
    encrypt = project.pgp_encrypt_output
    final = out_dir / error_name_of_received(received_name, project.purl_prefix,
                                             project.purl_suffix, encrypted=encrypt)
    work = thread_scratch(processor.work_root)
    note = ErrorLog(work / "row-errors.csv")
    note.batch_errors.append(reason)
    if not encrypt:
        return note.publish(final, replace=True, mode=processor.result_mode)
    plain = note.publish(work / "errors-plain.csv", replace=True, mode=0o600)
    try:
        return processor.encrypt_file(plain, final, client.pgp_fingerprint, replace=True)
    finally:
        plain.unlink(missing_ok=True)


def write_refusal_note(processor: BatchProcessor, out_dir: Path, *, client_id: str,
                       project_id: str, received_name: str, reason: str) -> Path | None:
    """``<name>_refused.txt`` in ``out_dir``, saying why a file was refused before
    it was taken in (SFTP at open: OpenSSH sftp, curl and rclone do not print the
    status text); encrypted (``.txt.gpg``) for a project that encrypts its results.
    None for a name that cannot be a file of ours (it is in the status text only)."""
    text = (f"{received_name} was refused when it was uploaded: {reason}.\n"
            "Nothing of it was kept or processed.\n")
    return write_note(processor, out_dir, client_id=client_id, project_id=project_id,
                      name=f"{received_name}_refused.txt", text=text)


def write_note(processor: BatchProcessor, out_dir: Path, *, client_id: str,
               project_id: str, name: str, text: str) -> Path | None:
    """A text file ``name`` in ``out_dir`` (``name.gpg``, encrypted to the client's key,
    for a project that encrypts its results); None for a name that cannot be ours."""
    try:
        check_safe_name(name)
    except FileNameError:
        return None
    plain = thread_scratch(processor.work_root) / "note-plain.txt"
    plain.write_text(text, encoding="utf-8")
    try:
        return publish_result(processor, plain, out_dir / name, client_id=client_id,
                              project_id=project_id)
    finally:
        plain.unlink(missing_ok=True)


def publish_result(processor: BatchProcessor, source: Path, final: Path, *,
                   client_id: str, project_id: str) -> Path:
    """``source`` (a scratch file) published as the result ``final``, atomically, with the
    results' mode; encrypted to ``final.gpg`` for a project that encrypts its results
    (the plain file never appears beside the results)."""
    client = processor.clients[client_id]
    if client.projects[project_id].pgp_encrypt_output:
        return processor.encrypt_file(source, final.with_name(f"{final.name}.gpg"),
                                      client.pgp_fingerprint, replace=True)
    with AtomicFile(final, no_clobber=False, mode=processor.result_mode) as out, \
            source.open("rb") as f:
        shutil.copyfileobj(f, out.file)
        return out.commit()
