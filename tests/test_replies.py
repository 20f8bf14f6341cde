"""How our own mail is written: the fast header path folds as the email package does,
no header value carries a line break, and non-ASCII survives a real parser."""

from __future__ import annotations

import random
import string
from email import message_from_bytes, policy
from email.policy import Compat32

from purlgate.channels.replies import MAIL_POLICY, attach, new_message, set_text

STDLIB = Compat32(linesep="\r\n")


def test_headers_fold_exactly_as_the_email_package_folds_them() -> None:
    """Values that take the fast path (ASCII, fitting on their line) and values that do
    not (long, non-ASCII) come out byte for byte as compat32's Header folding writes
    them."""
    rng = random.Random(8)
    alphabet = string.ascii_letters + string.digits + " <>@.,;:=?\"'()[]-_/\\!#$%&*+{}|~^`"
    values = ["", " ", "  leading and trailing  ", "a" * 70, "x" * 200, "Données été",
              " ".join(f"<ref{i}.abcdefghijkl@example.com>" for i in range(6))]
    values += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 90)))
               for _ in range(5000)]
    for value in values:
        for name in ("Subject", "References", "To"):
            assert MAIL_POLICY.fold_binary(name, value) == STDLIB.fold_binary(name, value)
            assert MAIL_POLICY.fold(name, value) == STDLIB.fold(name, value)


def test_no_header_value_carries_a_line_break_and_non_ascii_survives() -> None:
    message = new_message()
    message["From"] = "sftp-usa@idomoo.com"
    message["To"] = "Data Team <data-team@acme.example>"
    message["Subject"] = "Re: Données\r\nBcc: victim@evil.example\x00\t!"
    set_text(message, "Fichier reçu.\n")
    attach(message, b"PK\x03\x04", maintype="application", subtype="zip",
           filename="PURL_données.zip")
    raw = message.as_bytes()
    parsed = message_from_bytes(raw, policy=policy.default)
    assert parsed["Subject"] == "Re: Données Bcc: victim@evil.example !"
    assert "Bcc" not in parsed
    body = parsed.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert body.replace("\r\n", "\n") == "Fichier reçu.\n"
    [part] = list(parsed.iter_attachments())  # type: ignore[attr-defined]
    assert part.get_filename() == "PURL_données.zip"
    assert part.get_content() == b"PK\x03\x04"
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only, as on the wire
