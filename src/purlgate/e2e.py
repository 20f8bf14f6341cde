"""The end-to-end check a client's flow must pass before launch (the integration guide's
"End to End Testing - A Must!"): a 20-row file sent the way that client sends, the PURL
file awaited where that client gets it, and everything in it checked.

    purlgate e2e --region usa --client acme --project spring --channel email
    purlgate e2e --region usa --client acme --project spring --channel sftp \\
        --sftp-password-file fixtures/secrets/acme-sftp-password

Email: zipped (AES) with the client's password, mailed from its first sender address to
the region's address; the reply is caught on an SMTP sink where the region's relay
points (``--capture``). SFTP: uploaded to the client's Uploads with its login; the PURL
file (and the flag file when the project writes one) awaited in Downloads. Then: the
PURL file's name, all 20 rows intact, both link columns present, and every link
answering (200 for the landing page, a JPEG for the thumbnail).
"""

from __future__ import annotations

import asyncio
import csv
import io
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path

import aiohttp
import aiohttp.abc
import aiosmtplib
import asyncssh
from aiohttp.abc import ResolveResult
from aiosmtpd.smtp import SMTP

from purlgate.config import ClientConfig, Config, ProjectConfig, RegionConfig
from purlgate.core.archive import aes_zip, read_zip
from purlgate.core.naming import flag_name, parse_data_name, purl_name
from purlgate.errors import ArchiveError, ConfigError
from purlgate.replay import Capture

ROWS = 20
NAMES = ["José", "Zoë", "Łukasz", "Ana María", "Ørjan", "Siobhán", "Chloé", "Jürgen",
         "Ines", "Marta"]
LINK_COLUMNS = ("thumbnail_1", "landingPage")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Target:
    """Where the check sends and listens (defaults from the region's config)."""

    smtp: tuple[str, int]
    capture: tuple[str, int]
    sftp: tuple[str, int] | None
    sftp_password: str | None = None
    sftp_key: Path | None = None
    links_base: str | None = None  # fetch links here instead of the public base URL
    insecure: bool = False  # accept a self-signed certificate on the links
    trust: Path | None = None  # a certificate to trust on the links (serve's self-signed)
    timeout: float = 120.0


def _local(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # noqa: S104


def default_target(region: RegionConfig, **given: object) -> Target:
    """Where the region's config says serve listens; a region whose web side makes its
    own certificate has that certificate trusted for the links (no --insecure)."""
    sftp = (_local(region.sftp.host), region.sftp.port) if region.sftp is not None else None
    trust = (region.data_dir / "web-tls" / "cert.pem"
             if region.web is not None and region.web.self_signed else None)
    values: dict[str, object] = {
        "smtp": (_local(region.smtp.host), region.smtp.port),
        "capture": (_local(region.relay.host), region.relay.port), "sftp": sftp,
        "trust": trust}
    values.update({k: v for k, v in given.items() if v is not None})
    return Target(**values)  # type: ignore[arg-type]


def sample(project: ProjectConfig, now: datetime, client_id: str,
           project_id: str) -> tuple[str, list[str], list[list[str]]]:
    """A fresh file name (so the check can run again) and 20 rows of the agreed columns."""
    header = [c.name for c in project.columns] or ["first_name", "last_name", "email", "city"]
    rows = []
    for i in range(ROWS):
        row = []
        for column in header:
            key = column.casefold()
            if "mail" in key:
                row.append(f"e2e.{i}@example.com")
            elif "first" in key or key == "name":
                row.append(NAMES[i % len(NAMES)])
            elif "last" in key:
                row.append(f"Tester {i}")
            else:
                row.append(f"{column} {i}, e2e")  # a comma: quoting must survive
        rows.append(row)
    name = f"{client_id}_{project_id}_{now:%Y%m%d_%H%M%S}_{now.microsecond // 10000:02d}.csv"
    return name, header, rows


def _csv(header: Sequence[str], rows: Sequence[Sequence[str]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode("utf-8")


@dataclass(frozen=True)
class Plan:
    """What one run sends and expects back."""

    region: RegionConfig
    client: ClientConfig
    project: ProjectConfig
    project_id: str
    name: str  # the data file's name
    body: bytes
    expected: str  # the PURL file's name


async def run_e2e(config: Config, region_id: str, client_id: str, project_id: str, *,
                  channel: str, target: Target, data: Path | None = None) -> list[Check]:
    region = config.region(region_id)
    client = config.clients_of(region_id).get(client_id)
    if client is None:
        raise ConfigError(f"no client {client_id!r} in region {region_id}")
    project = client.projects.get(project_id)
    if project is None:
        raise ConfigError(f"client {client_id} has no project {project_id!r}; projects: "
                          + ", ".join(client.projects))
    now = datetime.now(UTC)
    name, header, rows = sample(project, now, client_id, project_id)
    body = _csv(header, rows)
    if data is not None:
        name, body = data.name, data.read_bytes()
        parsed = list(csv.reader(io.StringIO(body.decode("utf-8-sig"), newline="")))
        header, rows = parsed[0], parsed[1:]
    expected = purl_name(parse_data_name(name), project.purl_prefix, project.purl_suffix)
    checks = [Check("file", True, f"{name}: {len(rows)} rows, columns {', '.join(header)}")]
    plan = Plan(region, client, project, project_id, name, body, expected)
    if channel == "email":
        got = await _by_email(plan, target, checks)
    else:
        got = await _by_sftp(plan, target, checks)
    if got is not None:
        checks += await _check_purl(got, header, rows, region.public_base_url, target)
    return checks


async def _by_email(plan: Plan, target: Target, checks: list[Check]) -> bytes | None:
    region, client, name, expected = plan.region, plan.client, plan.name, plan.expected
    if client.zip_password is None or not client.senders:
        checks.append(Check("client", False, "the client has no zip_password or no senders: "
                                             "it cannot send by email"))
        return None
    password = client.zip_password.reveal()
    attachment = aes_zip({name: plan.body}, password)
    message = EmailMessage()
    message["From"] = client.senders[0]
    message["To"] = region.inbound_addresses[0]
    message["Subject"] = f"purlgate e2e {name}"
    message["Message-ID"] = make_msgid(domain=client.senders[0].rsplit("@", 1)[1])
    message.set_content("The 20-row end-to-end check before launch.")
    message.add_attachment(attachment, maintype="application", subtype="zip",
                           filename=name.rsplit(".", 1)[0] + ".zip")
    sink = Capture()
    server = await asyncio.get_running_loop().create_server(
        lambda: SMTP(sink), target.capture[0], target.capture[1])
    try:
        await aiosmtplib.send(message, hostname=target.smtp[0], port=target.smtp[1],
                              start_tls=False, timeout=target.timeout)
        checks.append(Check("sent", True, f"mailed to {message['To']} via "
                                          f"{target.smtp[0]}:{target.smtp[1]} (250)"))
        reply = await sink.reply_to(str(message["Message-ID"]).strip(), target.timeout)
    except aiosmtplib.SMTPException as exc:
        checks.append(Check("sent", False, f"the gateway refused the mail: {exc}"))
        return None
    finally:
        server.close()
        await server.wait_closed()
    if reply is None:
        checks.append(Check("reply", False, f"no reply within {target.timeout:g} s on the "
                                            f"capture sink {target.capture[0]}:"
                                            f"{target.capture[1]}"))
        return None
    checks.append(Check("reply", True, f"{reply['Subject']}"))
    zips = [p for p in reply.iter_attachments() if p.get_filename("").endswith(".zip")]
    if not zips:
        text = reply.get_body(("plain",))
        reason = text.get_content().strip().splitlines()[0] if text is not None else "?"
        checks.append(Check("purl file", False, f"the reply has no ZIP: {reason}"))
        return None
    raw = zips[0].get_payload(decode=True)
    assert isinstance(raw, bytes)
    try:
        members = read_zip(raw, password).members
    except ArchiveError as exc:
        checks.append(Check("purl file", False, f"the ZIP does not open with the client's "
                                                f"password ({exc.message})"))
        return None
    if expected not in members:
        checks.append(Check("purl file", False, f"the ZIP holds {list(members)}, "
                                                f"not {expected}"))
        return None
    content = members[expected]
    checks.append(Check("purl file", True, f"{expected} in an AES ZIP that opens with the "
                                           "client's password"))
    return content


async def _by_sftp(plan: Plan, target: Target, checks: list[Check]) -> bytes | None:
    client, project, name, expected = plan.client, plan.project, plan.name, plan.expected
    if client.sftp is None or target.sftp is None:
        checks.append(Check("client", False, "no SFTP account for this client or region"))
        return None
    if target.sftp_password is None and target.sftp_key is None:
        checks.append(Check("login", False, "give --sftp-password-file or --sftp-key"))
        return None
    base = "" if client.sftp.flat else f"/{plan.project_id}"
    keys = [str(target.sftp_key)] if target.sftp_key is not None else None
    try:
        async with asyncssh.connect(
            target.sftp[0], target.sftp[1], username=client.sftp.username,
            password=target.sftp_password, client_keys=keys, known_hosts=None,
        ) as conn, conn.start_sftp_client() as sftp:
            async with sftp.open(f"{base}/Uploads/{name}", "wb") as f:
                await f.write(plan.body)
            checks.append(Check("uploaded", True, f"{base}/Uploads/{name} as "
                                                  f"{client.sftp.username}"))
            wanted = {expected} | ({flag_name(expected)} if project.flag_file else set())
            deadline = asyncio.get_running_loop().time() + target.timeout
            while True:
                listing = set(await sftp.listdir(f"{base}/Downloads"))
                if wanted <= listing:
                    break
                errors = [n for n in listing if n.startswith(expected.rsplit(".", 1)[0])
                          and n.endswith("_errors.csv")]
                if errors and expected not in listing:
                    checks.append(Check("purl file", False, f"only an error file came: "
                                                            f"{errors[0]}"))
                    return None
                if asyncio.get_running_loop().time() > deadline:
                    checks.append(Check("purl file", False, f"{sorted(wanted - listing)} not "
                                        f"in Downloads after {target.timeout:g} s"))
                    return None
                await asyncio.sleep(0.5)
            async with sftp.open(f"{base}/Downloads/{expected}", "rb") as f:
                content: bytes = await f.read()
    except (OSError, asyncssh.Error) as exc:
        checks.append(Check("login", False, f"SFTP {target.sftp[0]}:{target.sftp[1]}: {exc}"))
        return None
    flag = " and its .flg" if project.flag_file else ""
    checks.append(Check("purl file", True, f"{expected}{flag} in {base}/Downloads"))
    return content


async def _check_purl(content: bytes, header: list[str], rows: list[list[str]],
                      public_base: str, target: Target) -> list[Check]:
    checks = []
    table = list(csv.reader(io.StringIO(content.decode("utf-8-sig"), newline="")))
    got_header, got_rows = table[0], table[1:]
    if got_header[-2:] != list(LINK_COLUMNS):
        return [Check("columns", False, f"the last columns are {got_header[-2:]}, not "
                                        f"{list(LINK_COLUMNS)}")]
    data_columns = got_header[:-2]
    checks.append(Check("columns", True, ", ".join(got_header)))
    index = [header.index(c) for c in data_columns if c in header]
    sent = [[row[i] for i in index] for row in rows]
    intact = [row[:-2] for row in got_rows] == sent
    checks.append(Check("rows", intact and len(got_rows) == len(rows),
                        f"{len(got_rows)} of {len(rows)} rows, values "
                        + ("identical" if intact else "changed")))
    context: ssl.SSLContext | bool = True
    if target.insecure:
        context = False
    elif target.trust is not None and target.trust.is_file():
        context = ssl.create_default_context(cafile=str(target.trust))
    failures: list[str] = []
    connector = aiohttp.TCPConnector(resolver=LoopbackResolver())
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60),
                                     connector=connector) as http:
        for row in got_rows:
            thumb, page = row[-2], row[-1]
            if target.links_base:
                thumb = thumb.replace(public_base, target.links_base, 1)
                page = page.replace(public_base, target.links_base, 1)
            try:
                async with http.get(page, ssl=context) as resp:
                    if resp.status != 200 or "text/html" not in resp.content_type:
                        failures.append(f"{page}: {resp.status} {resp.content_type}")
                async with http.get(thumb, ssl=context) as resp:
                    head = await resp.content.read(3)
                    if resp.status != 200 or head != b"\xff\xd8\xff":
                        failures.append(f"{thumb}: {resp.status}, not a JPEG")
            except (aiohttp.ClientError, TimeoutError) as exc:
                failures.append(f"{page}: {type(exc).__name__}: {exc}")
    checks.append(Check("links", not failures, f"{len(got_rows)} landing pages (200) and "
                        f"thumbnails (JPEG) answer" if not failures else
                        f"{len(failures)} failed; first: {failures[0]}"))
    return checks


class LoopbackResolver(aiohttp.abc.AbstractResolver):
    """``localhost`` and every ``*.localhost`` name (the bundled ``purl-usa.localhost``)
    resolve to the loopback address, as browsers do and RFC 6761 lets applications do;
    other names as the system resolves them."""

    def __init__(self) -> None:
        self._system = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        name = host.lower().rstrip(".")
        if name == "localhost" or name.endswith(".localhost"):
            return [{"hostname": host, "host": "127.0.0.1", "port": port,
                     "family": socket.AF_INET, "proto": 0, "flags": socket.AI_NUMERICHOST}]
        return await self._system.resolve(host, port, family)

    async def close(self) -> None:
        await self._system.close()


def report(checks: Sequence[Check]) -> str:
    lines = [f"{'PASS' if c.ok else 'FAIL'}  {c.name:<10} {c.detail}" for c in checks]
    ok = all(c.ok for c in checks)
    lines.append("e2e passed" if ok else "e2e FAILED")
    return "\n".join(lines)
