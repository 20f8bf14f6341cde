"""The sender checks against a real DNS server on 127.0.0.1 (tests/dns_helpers.py): SPF,
DKIM, DMARC and ARC verdicts, the policies' exact refusals, a trusted MTA's header
read and a forged one ignored, and a DNS that does not answer."""

from __future__ import annotations

import time
from pathlib import Path

import aiosmtplib
import pytest

from purlgate.channels.resolver import Resolver
from purlgate.channels.sender_auth import SenderChecks
from purlgate.channels.sender_policy import Verdicts, decide
from purlgate.cli import main
from purlgate.config import DnsConfig, SenderAuthConfig
from tests.config_builder import own, region_toml
from tests.dns_helpers import Zones, forwarded, message, signed
from tests.mail_helpers import (
    INBOUND,
    PASSWORD,
    Running,
    Sink,
    T,
    aes_zip,
    client_mail,
    drained,
    rows,
    start,
)


def checks(port: int, **config: object) -> SenderChecks:
    resolver = Resolver(DnsConfig(servers=[f"127.0.0.1:{port}"], timeout_seconds=1))
    return SenderChecks(SenderAuthConfig(**config), resolver, hostname="purlgate.test")


def test_signed_mail_from_the_client_s_servers_passes_everything(
        dns_server: tuple[Zones, int]) -> None:
    zones, port = dns_server
    v = checks(port).verify(signed(message(), zones), ip="127.0.0.1", helo="mx.acme.test",
                            mail_from="bounce@acme.test")
    assert (v.spf, v.dkim, v.dkim_aligned, v.dmarc, v.dmarc_policy, v.arc) == (
        "pass", (("acme.test", "pass"),), True, "pass", "reject", "none")
    assert v.summary() == ("spf=pass dkim=pass(acme.test) dmarc=pass(p=reject) arc=none "
                           "from=acme.test by=purlgate.test")
    assert decide("require-dmarc", v) is None and decide("require-dkim", v) is None


def test_a_forgery_fails_and_each_policy_says_what_to_fix(
        dns_server: tuple[Zones, int]) -> None:
    """Mail claiming acme.test from an address its SPF does not list, with a signature
    that no longer matches the body: SPF and DKIM fail, DMARC fails; record accepts
    (the verdicts are kept), require-dmarc and require-dkim refuse, saying why."""
    zones, port = dns_server
    tampered = signed(message(), zones).replace(b"Here is the file.", b"Here is a file!!")
    v = checks(port).verify(tampered, ip="10.9.8.7", helo="evil.example",
                            mail_from="bounce@acme.test")
    assert (v.spf, v.dkim, v.dmarc) == ("fail", (("acme.test", "fail"),), "fail")
    assert decide("record", v) is None
    refusal = decide("require-dmarc", v)
    assert refusal is not None and refusal.smtp == (
        "550 5.7.26 DMARC failed for acme.test (SPF fail, DKIM not aligned): your mail "
        "administrator must sign mail for acme.test with DKIM, or send it from servers "
        "acme.test's SPF record lists")
    refusal = decide("require-dkim", v)
    assert refusal is not None and refusal.smtp == (
        "550 5.7.20 the DKIM signature did not verify; your mail administrator must check "
        "the DKIM key published for acme.test and that nothing rewrites the message")
    unsigned = checks(port).verify(message(), ip="127.0.0.1", helo="mx.acme.test",
                                   mail_from="bounce@acme.test")
    assert (unsigned.spf, unsigned.dkim, unsigned.dmarc) == ("pass", (), "pass")
    refusal = decide("require-dkim", unsigned)
    assert refusal is not None and refusal.smtp.startswith(
        "550 5.7.20 the message has no DKIM signature; this account requires mail signed "
        "with DKIM for acme.test")


def test_no_dmarc_record_and_a_misaligned_signature(dns_server: tuple[Zones, int]) -> None:
    """A From domain without a DMARC record: none (require-dmarc refuses, asking for
    one); a valid signature of another domain with SPF for that domain: DMARC fails,
    require-dkim names the signer it got and the one it needs."""
    zones, port = dns_server
    raw = signed(message("files@nodmarc.test"), zones, "nodmarc.test")
    v = checks(port).verify(raw, ip="127.0.0.1", helo="mx", mail_from="files@nodmarc.test")
    assert (v.dkim, v.dkim_aligned, v.dmarc) == ((("nodmarc.test", "pass"),), True, "none")
    refusal = decide("require-dmarc", v)
    assert refusal is not None and refusal.smtp == (
        "550 5.7.26 nodmarc.test publishes no DMARC policy, which this account requires: "
        "your mail administrator must publish one at _dmarc.nodmarc.test")
    assert decide("require-dkim", v) is None
    other = signed(message(), zones, "other.test")
    v = checks(port).verify(other, ip="127.0.0.1", helo="mx.other.test",
                            mail_from="bounce@other.test")
    assert (v.spf, v.dkim, v.dkim_aligned, v.dmarc) == (
        "pass", (("other.test", "pass"),), False, "fail")
    refusal = decide("require-dkim", v)
    assert refusal is not None and refusal.smtp == (
        "550 5.7.22 no valid DKIM signature matches the From domain acme.test (signed by "
        "other.test); your mail administrator must sign with d=acme.test")


def test_an_arc_sealed_forward_passes_only_by_a_trusted_sealer(
        dns_server: tuple[Zones, int]) -> None:
    """A forwarder broke the original signature (a footer) and sent from its own
    servers, sealing the chain with ARC after recording a DMARC pass: DMARC fails on
    its own; with the forwarder as a trusted sealer it passes, and says why."""
    zones, port = dns_server
    raw = forwarded(signed(message(), zones), zones)
    args = {"ip": "127.0.0.1", "helo": "mx.forwarder.test",
            "mail_from": "bounce@forwarder.test"}
    plain = checks(port).verify(raw, **args)  # type: ignore[arg-type]
    assert (plain.dkim, plain.arc, plain.dmarc) == ((("acme.test", "fail"),), "pass", "fail")
    trusted = checks(port, trusted_arc_sealers=["forwarder.test"]).verify(
        raw, **args)  # type: ignore[arg-type]
    assert (trusted.arc, trusted.dmarc) == ("pass", "pass")
    assert trusted.notes == ("dmarc passed at the first hop, ARC sealed by forwarder.test",)
    assert decide("require-dmarc", trusted) is None


def test_a_trusted_mta_s_header_is_read_and_forged_ones_are_not(
        dns_server: tuple[Zones, int]) -> None:
    """Behind a trusted MTA its topmost Authentication-Results is read; a sender's own
    header (under another id, or under the MTA's id below the MTA's) changes nothing.
    Checking here, every such header is ignored: the forged pass does not pass."""
    _zones, port = dns_server
    forged = (b"Authentication-Results: mx.idomoo.test; dkim=pass header.d=acme.test; "
              b"spf=pass smtp.mailfrom=acme.test; dmarc=pass header.from=acme.test\r\n")
    real = (b"Authentication-Results: mx.idomoo.test; dkim=none; "
            b"spf=softfail smtp.mailfrom=bounce@acme.test; dmarc=fail header.from=acme.test\r\n")
    sender_s = b"Authentication-Results: evil.example; dmarc=pass header.from=acme.test\r\n"
    behind = checks(port, trusted_authserv_id="mx.idomoo.test")
    head = message(extra=real + sender_s + forged).split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    v = behind.from_headers(head)
    assert (v.by, v.spf, v.dkim, v.dmarc) == ("mx.idomoo.test", "softfail", (), "fail")
    refusal = decide("require-dmarc", v)
    assert refusal is not None and refusal.smtp.startswith("550 5.7.26 DMARC failed")
    nothing = behind.from_headers(message(extra=sender_s).split(b"\r\n\r\n")[0] + b"\r\n\r\n")
    assert (nothing.dmarc, nothing.notes) == (
        "none", ("no Authentication-Results from mx.idomoo.test",))
    here = checks(port).verify(message(extra=forged), ip="10.9.8.7", helo="evil.example",
                               mail_from="bounce@acme.test")
    assert (here.spf, here.dkim, here.dmarc) == ("fail", (), "fail")


def test_dns_that_does_not_answer_is_a_temporary_error_never_a_pass(
        dns_server: tuple[Zones, int]) -> None:
    """The From domain's DMARC lookup times out (1 s): DMARC is temperror; record
    accepts and keeps it, require-dmarc answers 451 4.4.3, within the timeout."""
    _zones, port = dns_server
    started = time.monotonic()
    v = checks(port).verify(message("ops@slow.test"), ip="127.0.0.1", helo="mx",
                            mail_from="ops@slow.test")
    assert time.monotonic() - started < 5
    assert v.dmarc == "temperror"
    assert decide("record", v) is None
    refusal = decide("require-dmarc", v)
    assert refusal is not None and refusal.temporary and refusal.smtp == (
        "451 4.4.3 Could not check who sent this message (DNS did not answer); please try "
        "again later")


def test_answers_are_cached_for_their_ttl(dns_server: tuple[Zones, int]) -> None:
    """A second check of the same sender asks the DNS server nothing new."""
    zones, port = dns_server
    checker = checks(port)
    raw = signed(message(), zones)
    checker.verify(raw, ip="127.0.0.1", helo="mx", mail_from="bounce@acme.test")
    asked = len(zones.queries)
    again = checker.verify(raw, ip="127.0.0.1", helo="mx", mail_from="bounce@acme.test")
    assert again.dmarc == "pass" and len(zones.queries) == asked


def test_verdicts_name_no_local_part() -> None:
    v = Verdicts("purlgate.test", "acme.test", "pass", "acme.test")
    assert "@" not in v.summary()


# -- in the SMTP session and the worker ---------------------------------------------

ZIP_NAME = f"acme_spring_{T}_00"


def gateway_config(relay: int, dns_port: int, policy: str, **sender_auth: object) -> str:
    tables: dict[str, object] = {
        "smtp": {"port": 0}, "relay": {"host": "127.0.0.1", "port": relay,
                                       "retry_first_seconds": 0.2,
                                       "operator": "ops@idomoo.example"},
        "dns": {"servers": [f"127.0.0.1:{dns_port}"], "timeout_seconds": 1}}
    if sender_auth:
        tables["sender_auth"] = sender_auth
    return region_toml(**tables) + f"""[clients.acme]
name = "Acme"
regions = ["usa"]
senders = ["data-team@acme.test", "ops@slow.test"]
zip_password = {{ env = "PG_TEST_ACME_ZIP" }}
sender_auth = "{policy}"

[clients.acme.projects.spring]
"""


def acme_mail(zones: Zones | None = None, sender: str = "data-team@acme.test",
              extra: bytes = b"") -> bytes:
    raw = extra + client_mail(
        [(f"{ZIP_NAME}.zip", aes_zip({f"{ZIP_NAME}.csv": rows()}), "application/zip")],
        sender=sender)
    return signed(raw, zones) if zones is not None else raw


async def _send(run: Running, raw: bytes, sender: str = "data-team@acme.test") -> str:
    """The server's answer to DATA (250 or the refusal's code and text)."""
    try:
        await aiosmtplib.send(raw, sender=sender, recipients=[INBOUND], hostname="127.0.0.1",
                              port=run.port, start_tls=False)
    except aiosmtplib.SMTPDataError as exc:
        return f"{exc.code} {exc.message}"
    return "250"


@pytest.mark.asyncio
async def test_require_dmarc_refuses_a_forgery_in_the_session_and_keeps_nothing(
        tmp_path: Path, dns_server: tuple[Zones, int], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Mail claiming acme.test from a server its SPF does not list, unsigned: 550 5.7.26
    at DATA's end saying what to fix; nothing spooled, no reply to anyone. The same
    file signed by acme.test's key passes, and its batch keeps the verdicts and where
    it came from."""
    zones, port = dns_server
    zones.txt["acme.test"] = ["v=spf1 ip4:192.0.2.1 -all"]  # not this machine
    monkeypatch.setenv("PG_TEST_ACME_ZIP", PASSWORD.decode())
    caplog.set_level("INFO", logger="purlgate.smtp")
    sink = await Sink().start()
    run = await start(tmp_path, sink, text=gateway_config(sink.port, port, "require-dmarc"))
    try:
        answer = await _send(run, acme_mail())
        assert answer == (
            "550 5.7.26 DMARC failed for acme.test (SPF fail, DKIM none): your mail administrator "
            "must sign mail for acme.test with DKIM, or send it from servers acme.test's "
            "SPF record lists")
        assert run.spooled() == []
        assert list(own(run.data_dir / "spool" / "tmp").iterdir()) == [], "nothing kept"
        assert await _send(run, acme_mail(zones)) == "250"
        await sink.wait_to("data-team@acme.test", timeout=30)
        await drained(run.gateway)
        [batch] = run.gateway.region.store.recent()
    finally:
        await run.shutdown()
        await sink.stop()
    assert len(sink.messages) == 1, "one reply: to the signed mail, none to the forgery"
    assert batch.state.value == "Done" and batch.sender_auth is not None
    assert batch.sender_auth.startswith(
        "spf=fail dkim=pass(acme.test) dmarc=pass(p=reject) arc=none from=acme.test")
    assert batch.source is not None and batch.source.startswith(
        "data-team@acme.test from 127.0.0.1")
    assert "refused a message from data-team@acme.test: DMARC failed" in caplog.text


@pytest.mark.asyncio
async def test_require_dkim_and_dns_that_does_not_answer(
        tmp_path: Path, dns_server: tuple[Zones, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """require-dkim: a mail signed by another domain is 550 5.7.22 naming both; a sender
    whose domain's DNS does not answer in time gets 451 4.4.3 (its server tries again
    later), never a pass."""
    zones, port = dns_server
    monkeypatch.setenv("PG_TEST_ACME_ZIP", PASSWORD.decode())
    sink = await Sink().start()
    run = await start(tmp_path, sink, text=gateway_config(sink.port, port, "require-dkim"))
    try:
        other = signed(acme_mail(), zones, "other.test")
        assert await _send(run, other) == (
            "550 5.7.22 no valid DKIM signature matches the From domain acme.test (signed by "
            "other.test); your mail administrator must sign with d=acme.test")
        zones.dkim_key("s1", "slow.test")
        slow = signed(acme_mail(sender="ops@slow.test"), zones, "slow.test")
        assert await _send(run, slow, sender="ops@slow.test") == (
            "451 4.4.3 Could not check who sent this message (DNS did not answer); please try "
            "again later")
        assert run.spooled() == []
    finally:
        await run.shutdown()
        await sink.stop()
    assert sink.messages == []


@pytest.mark.asyncio
async def test_record_keeps_a_failing_verdict_and_processes(
        tmp_path: Path, dns_server: tuple[Zones, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """The default policy refuses nothing: the batch runs and its record says DMARC
    failed, for an operator to see (batch view, purlgate batches --json)."""
    zones, port = dns_server
    zones.txt["acme.test"] = ["v=spf1 ip4:192.0.2.1 -all"]
    monkeypatch.setenv("PG_TEST_ACME_ZIP", PASSWORD.decode())
    sink = await Sink().start()
    run = await start(tmp_path, sink, text=gateway_config(sink.port, port, "record"))
    try:
        assert await _send(run, acme_mail()) == "250"
        await sink.wait_to("data-team@acme.test", timeout=30)
        await drained(run.gateway)
        [batch] = run.gateway.region.store.recent()
    finally:
        await run.shutdown()
        await sink.stop()
    assert batch.state.value == "Done"
    assert batch.sender_auth == ("spf=fail dkim=none dmarc=fail(p=reject) arc=none "
                                 "from=acme.test by=purlgate.localhost")


@pytest.mark.asyncio
async def test_mailbox_mail_is_judged_by_the_trusted_header_and_answered_to_the_client(
        tmp_path: Path, dns_server: tuple[Zones, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Mail the IMAP poller takes is checked by the mailbox's own Authentication-Results
    (the trusted authserv-id), a sender's forged pass ignored: under require-dmarc a
    fail is answered to the client's registered address, nothing processed."""
    _zones, port = dns_server
    monkeypatch.setenv("PG_TEST_ACME_ZIP", PASSWORD.decode())
    sink = await Sink().start()
    text = gateway_config(sink.port, port, "require-dmarc",
                          trusted_authserv_id="mx.mailbox.test")
    run = await start(tmp_path, sink, text=text)
    real = (b"Authentication-Results: mx.mailbox.test; dkim=none; spf=fail "
            b"smtp.mailfrom=data-team@acme.test; dmarc=fail header.from=acme.test\r\n")
    forged = b"Authentication-Results: mx.mailbox.test; dmarc=pass header.from=acme.test\r\n"
    try:
        entry = run.gateway.spool.accept(acme_mail(extra=real + forged), {
            "channel": "imap", "mail_from": "data-team@acme.test", "rcpt_tos": [INBOUND]})
        run.gateway.worker.submit(entry)
        [reply] = await sink.wait_to("data-team@acme.test", timeout=30)
        await drained(run.gateway)
        batches = run.gateway.region.store.recent()
    finally:
        await run.shutdown()
        await sink.stop()
    body_part = reply.message.get_body(("plain",))
    assert body_part is not None
    body = body_part.get_content()
    assert "who sent this message could not be confirmed: DMARC failed for acme.test" in body
    assert batches == [], "nothing processed"


def test_check_config_warns_of_a_missing_dmarc_policy_only_where_required(
        tmp_path: Path, dns_server: tuple[Zones, int], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A require-dmarc client whose sender domain has no DMARC record is warned about
    (its mail would be refused); the same domain under record is not, nor a domain
    that has one."""
    _zones, port = dns_server
    monkeypatch.setenv("PG_TEST_ACME_ZIP", PASSWORD.decode())
    text = gateway_config(2525, port, "require-dmarc").replace(
        'senders = ["data-team@acme.test", "ops@slow.test"]',
        'senders = ["data-team@acme.test", "files@nodmarc.test"]') + """
[clients.globex]
name = "Globex"
regions = ["usa"]
senders = ["files@nodmarc.test"]
[clients.globex.projects.main]
"""
    (tmp_path / "regions.toml").write_text(text)
    assert main(["check-config", "--config", str(tmp_path / "regions.toml")]) == 0
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning:  region usa: client acme (require-dmarc): nodmarc.test publishes no DMARC "
        "policy (_dmarc.nodmarc.test): its mail will be refused until it does"]
    assert "configuration OK (1 warning(s))" in out
