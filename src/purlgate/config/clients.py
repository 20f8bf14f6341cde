"""A client and its projects: senders, secrets, PGP key, SFTP account, and per project
the agreed columns, the PURL file's name and dialect, the render backend."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, Self, get_args
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from purlgate.config.base import Fingerprint, Identifier, Model, email_address
from purlgate.config.secrets import SecretRef


class ColumnSpec(Model):
    name: str = Field(min_length=1)
    required: bool = False

    @field_validator("name")
    @classmethod
    def _stripped(cls, value: str) -> str:
        return value.strip()


Delimiter = Literal[",", ";", "|", "\t"]
Encoding = Literal["utf-8", "utf-8-sig", "windows-1252"]


Output = Literal["thumbnail", "video"]


class RenderSettings(Model):
    """How a project's rows get their media and links.

    ``embedded``: the gateway's own web side renders the landing page, thumbnail and
    video from the row and the template. ``storyboard-api``: the platform's render API
    (the region's ``[regions.<id>.storyboard]``) makes them and its links are used.
    """

    backend: Literal["embedded", "storyboard-api"] = "embedded"
    # embedded: a folder with landing.html, template.toml and static/ (default: bundled)
    template: Path | None = None
    # embedded: render these for every row when the batch ends, not on first view
    pregenerate: list[Output] = Field(default_factory=list)
    # embedded: the columns the web side keeps of each row (for the page and media), as
    # listed; default: those the template reads (the row store keeps nothing else)
    keep_columns: list[str] | None = None
    # storyboard-api: the storyboard to render, and column -> API data key
    storyboard_id: str | None = None
    fields: dict[str, str] = Field(default_factory=dict)  # default: the column's own name

    @model_validator(mode="after")
    def _backend_settings(self) -> Self:
        if self.backend == "storyboard-api" and not self.storyboard_id:
            raise ValueError("the storyboard-api backend needs a storyboard_id")
        if self.backend != "embedded" and (self.template is not None or self.pregenerate
                                           or self.keep_columns is not None):
            raise ValueError("template, pregenerate and keep_columns belong to the "
                             "embedded backend")
        return self


WebhookEvent = Literal["batch.received", "batch.loaded", "batch.done",
                       "batch.done_with_errors", "batch.failed", "validation.finished"]
WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = get_args(WebhookEvent)


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1, localhost and *.localhost (RFC 6761)."""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def origin(url: str) -> str:
    """scheme://host:port of ``url``: what a log line or an alert may show of an
    endpoint (its path and query can hold a token)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{parts.hostname}:{port}"


class WebhookConfig(Model):
    """Where a batch's outcome is POSTed, signed as Standard Webhooks say."""

    url: str
    # "whsec_" and the base64 of 24 to 64 random bytes (`purlgate webhook-secret` makes
    # one), as the Standard Webhooks libraries take it.
    secret: SecretRef
    events: list[WebhookEvent] = Field(default_factory=lambda: list(WEBHOOK_EVENTS),
                                       min_length=1)

    @field_validator("url")
    @classmethod
    def _https(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("https", "http") or not parts.hostname \
                or parts.username or parts.password or parts.fragment:
            raise ValueError("must be an https:// URL, without user, password or fragment")
        if parts.scheme == "http" and not is_loopback_host(parts.hostname):
            raise ValueError("must be https:// (plain http only to the loopback address)")
        return value


class ProjectConfig(Model):
    columns: list[ColumnSpec] = Field(default_factory=list)
    keep_all_columns: bool = True
    purl_prefix: str = "PURL_"
    purl_suffix: str = ""
    error_file: bool = True
    flag_file: bool = True
    encoding: Encoding | None = None
    delimiter: Delimiter | None = None
    output_encoding: Encoding | None = None
    output_delimiter: Delimiter | None = None
    notify: list[str] = Field(default_factory=list)
    webhooks: list[WebhookConfig] = Field(default_factory=list)  # besides the client's
    render: RenderSettings = Field(default_factory=RenderSettings)
    pgp_encrypt_output: bool = False  # PURL (and error) file encrypted to the client's key
    pgp_require_signature: bool = False  # inbound PGP must be signed by the client's key
    # How long the batch's links, row data, renders and SFTP results in Downloads live.
    retention_days: int = Field(default=30, gt=0, le=3650)

    @field_validator("notify")
    @classmethod
    def _emails(cls, value: list[str]) -> list[str]:
        return [email_address(v) for v in value]

    @field_validator("purl_prefix", "purl_suffix")
    @classmethod
    def _safe_affix(cls, value: str) -> str:
        if any(c in value for c in '/\\\0:*?"<>|') or value.strip() != value:
            raise ValueError("may not contain path separators, spaces at the ends or \\/:*?\"<>|")
        return value

    @model_validator(mode="after")
    def _columns_make_sense(self) -> Self:
        if not self.keep_all_columns and not self.columns:
            raise ValueError("list the agreed 'columns' or set keep_all_columns = true")
        names = [c.name.casefold() for c in self.columns]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"columns listed twice: {', '.join(dupes)}")
        return self


class ClientSftpConfig(Model):
    """A client's SFTP account. Passwords are stored only as a slow hash."""

    username: Identifier
    password_hash: str | None = None  # from `purlgate hash-password`
    authorized_keys: list[str] = Field(default_factory=list)  # OpenSSH public key lines
    flat: bool = False  # one project: /Uploads and /Downloads at the top
    # "close": an upload is complete when its file is closed (or a temporary name is
    # renamed); "rename": only a temporary name renamed to the final one counts.
    complete_on: Literal["close", "rename"] = "close"
    # The password `purlgate e2e` logs in with (a QA or demo account's), by secret
    # reference; check-config checks it against password_hash.
    e2e_password: SecretRef | None = None

    @model_validator(mode="after")
    def _some_way_in(self) -> Self:
        if self.password_hash is None and not self.authorized_keys:
            raise ValueError("give a password_hash, authorized_keys, or both")
        if self.e2e_password is not None and self.password_hash is None:
            raise ValueError("e2e_password needs the account's password_hash")
        if self.password_hash is not None and not self.password_hash.startswith("scrypt$"):
            raise ValueError("password_hash must come from `purlgate hash-password`")
        return self


class ClientConfig(Model):
    name: str
    regions: list[Identifier] = Field(min_length=1)
    senders: list[str] = Field(default_factory=list)
    notify: list[str] = Field(default_factory=list)
    webhooks: list[WebhookConfig] = Field(default_factory=list)  # every project's events
    # Who really sent a mail: "record" the SPF, DKIM, DMARC (and ARC) verdicts with the
    # batch; "require-dmarc": the From domain must pass DMARC; "require-dkim": a DKIM
    # signature aligned with the From domain must pass. Else the mail is refused.
    sender_auth: Literal["record", "require-dmarc", "require-dkim"] = "record"
    zip_password: SecretRef | None = None
    pgp_public_key: Path | None = None  # armored or binary public key file (not a secret)
    pgp_fingerprint: Fingerprint | None = None  # pinned: the key file must hold this key
    sftp: ClientSftpConfig | None = None
    projects: dict[Identifier, ProjectConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _pgp_key_pinned(self) -> Self:
        if (self.pgp_public_key is None) != (self.pgp_fingerprint is None):
            raise ValueError("give both pgp_public_key and pgp_fingerprint, or neither")
        if self.sftp is not None and self.sftp.flat and len(self.projects) != 1:
            raise ValueError("sftp.flat needs exactly one project")
        uses = [pid for pid, p in self.projects.items()
                if p.pgp_encrypt_output or p.pgp_require_signature]
        if uses and self.pgp_fingerprint is None:
            raise ValueError(
                f"project(s) {', '.join(uses)} use PGP but the client has no "
                "pgp_public_key / pgp_fingerprint"
            )
        return self

    @field_validator("senders", "notify")
    @classmethod
    def _emails(cls, value: list[str]) -> list[str]:
        return [email_address(v) for v in value]


def client_of_sender(sender: str, clients: Mapping[str, ClientConfig]) -> str | None:
    """The client whose registered senders include ``sender`` (case-insensitive)."""
    sender = sender.lower()
    return next((cid for cid, c in clients.items() if sender in c.senders), None)
