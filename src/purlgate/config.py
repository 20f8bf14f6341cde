"""regions.toml as pydantic models; the only module that reads configuration files.

Layout (see the bundled ``regions.toml``)::

    [regions.<id>]                    one per instance: inbound addresses, data dir, links
    [regions.<id>.limits]             ZIP unwrap limits
    [clients.<id>]                    regions, senders, notification addresses, secrets
    [clients.<id>.projects.<id>]      columns, PURL name, error/flag files, dialect, render

Secrets are never values in the file: ``{ env = "NAME" }`` or ``{ file = "/path" }``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from purlgate.errors import ConfigError

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}$"
"""Client and project ids: no underscore, because `_` separates the parts of a file name."""

Identifier = Annotated[str, Field(pattern=ID_PATTERN)]
EMAIL_PATTERN = re.compile(r"^[^@\s<>\"]+@[^@\s<>\"]+\.[^@\s<>\"]+$")
DEFAULT_CONFIG_RESOURCE = "regions.toml"


def _email(value: str) -> str:
    if not EMAIL_PATTERN.match(value):
        raise ValueError(f"{value!r} is not an email address")
    return value.lower()


class _Model(BaseModel):
    # Unknown keys are typos until proven otherwise.
    model_config = ConfigDict(extra="forbid", frozen=True)


class SecretRef(_Model):
    """Where a secret lives: an environment variable or a file, never the config itself."""

    env: str | None = None
    file: Path | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of 'env' or 'file'")
        return self

    def describe(self) -> str:
        return f"environment variable {self.env}" if self.env else f"file {self.file}"

    def reveal(self) -> bytes:
        """Read the secret now; a missing one is a ConfigError naming where it was sought."""
        if self.env is not None:
            value = os.environ.get(self.env)
            if value is None:
                raise ConfigError(f"secret not set: {self.describe()}")
            return value.encode()
        assert self.file is not None
        try:
            data = self.file.read_bytes()
        except OSError as exc:
            raise ConfigError(f"secret unreadable: {self.describe()}: {exc.strerror}") from exc
        # Files written by `echo` end in a newline that is not part of the secret.
        return data.rstrip(b"\r\n")


def _no_spaces(value: object) -> object:
    """Fingerprints are often pasted in groups of four; compare them without spaces."""
    return value.replace(" ", "").upper() if isinstance(value, str) else value


FINGERPRINT_PATTERN = r"^[0-9A-F]{40}$|^[0-9A-F]{64}$"
Fingerprint = Annotated[str, BeforeValidator(_no_spaces), Field(pattern=FINGERPRINT_PATTERN)]


class PgpConfig(_Model):
    """The region's own key pair. One GNUPGHOME per instance (created 0700)."""

    fingerprint: Fingerprint  # our key, pinned: a keyring holding another key is refused
    private_key: SecretRef | None = None  # armored secret key; None: already in ``home``
    passphrase: SecretRef | None = None
    home: Path | None = None  # default: <data_dir>/gnupg
    sign_output: bool = False
    timeout_seconds: float = Field(default=600.0, gt=0)


class ColumnSpec(_Model):
    name: str = Field(min_length=1)
    required: bool = False

    @field_validator("name")
    @classmethod
    def _stripped(cls, value: str) -> str:
        return value.strip()


Delimiter = Literal[",", ";", "|", "\t"]
Encoding = Literal["utf-8", "utf-8-sig", "windows-1252"]


Output = Literal["thumbnail", "video"]


class RenderSettings(_Model):
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
    # storyboard-api: the storyboard to render, and column -> API data key
    storyboard_id: str | None = None
    fields: dict[str, str] = Field(default_factory=dict)  # default: the column's own name

    @model_validator(mode="after")
    def _backend_settings(self) -> Self:
        if self.backend == "storyboard-api" and not self.storyboard_id:
            raise ValueError("the storyboard-api backend needs a storyboard_id")
        if self.backend != "embedded" and (self.template is not None or self.pregenerate):
            raise ValueError("template and pregenerate belong to the embedded backend")
        return self


class ProjectConfig(_Model):
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
    render: RenderSettings = Field(default_factory=RenderSettings)
    pgp_encrypt_output: bool = False  # PURL (and error) file encrypted to the client's key
    pgp_require_signature: bool = False  # inbound PGP must be signed by the client's key
    # How long the batch's links, row data and renders live (and, later, its files).
    retention_days: int = Field(default=30, gt=0, le=3650)

    @field_validator("notify")
    @classmethod
    def _emails(cls, value: list[str]) -> list[str]:
        return [_email(v) for v in value]

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


class ClientConfig(_Model):
    name: str
    regions: list[Identifier] = Field(min_length=1)
    senders: list[str] = Field(default_factory=list)
    notify: list[str] = Field(default_factory=list)
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
        return [_email(v) for v in value]


class LimitsConfig(_Model):
    max_uncompressed_bytes: int = Field(default=4 * 1024**3, gt=0)
    max_compression_ratio: float = Field(default=250.0, gt=1)
    # Ratios of tiny members say nothing; a bomb must first get this big.
    ratio_check_after_bytes: int = Field(default=1024**2, ge=0)


class ProcessingConfig(_Model):
    """How the workers take spooled mail and uploads."""

    # Entries handled at once. Each client has its own queue and the queues are served
    # in turn. Mail is handled in worker processes (its Python work holds the GIL);
    # "threads" keeps it in the gateway's process. SFTP uploads use threads.
    workers: int = Field(default=2, ge=1, le=64)
    mode: Literal["processes", "threads"] = "processes"
    # An entry that fails (not a storage fault) is tried this many times, with doubling
    # delays from retry_seconds, then moved to the dead-letter folder.
    max_attempts: int = Field(default=3, ge=1, le=20)
    retry_seconds: float = Field(default=5.0, gt=0, le=3600)


class SmtpConfig(_Model):
    """The region's SMTP listener (the inbound addresses' MX points here)."""

    host: str = "127.0.0.1"
    port: int = Field(default=2525, ge=0, le=65535)
    hostname: str = "purlgate.localhost"  # the name in our banner and Message-IDs
    max_message_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    min_free_bytes: int = Field(default=256 * 1024 * 1024, ge=0)  # below: 452, not 250
    tls_cert: Path | None = None
    tls_key: Path | None = None
    require_starttls: bool = False
    # As Postfix's smtpd_client_connection_count_limit and process limit: beyond, 421.
    max_connections: int = Field(default=100, gt=0)
    max_connections_per_ip: int = Field(default=10, gt=0)
    # A session that sends no command for this long is closed (421).
    timeout_seconds: float = Field(default=300.0, gt=0)

    @model_validator(mode="after")
    def _tls_pair(self) -> Self:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give both tls_cert and tls_key, or neither")
        if self.require_starttls and self.tls_cert is None:
            raise ValueError("require_starttls needs tls_cert and tls_key")
        return self


class RelayConfig(_Model):
    """Where replies and notifications go out: the relay, with a durable outbox."""

    host: str = "127.0.0.1"
    port: int = Field(default=25, ge=1, le=65535)
    starttls: bool = False
    ca_file: Path | None = None  # CA bundle that signs the relay's certificate (else system)
    username: str | None = None
    password: SecretRef | None = None
    timeout_seconds: float = Field(default=60.0, gt=0)
    retry_first_seconds: float = Field(default=60.0, gt=0)  # then doubling
    retry_max_seconds: float = Field(default=3600.0, gt=0)
    expire_seconds: float = Field(default=2 * 24 * 3600.0, gt=0)
    # Messages handed to the relay at once, each on its own connection (Postfix's
    # default_destination_concurrency_limit is 20).
    max_connections: int = Field(default=8, ge=1, le=100)
    # A connection is kept open this long after a delivery for the next one (checked
    # with RSET first, as Postfix's connection cache does; its time limit is 2 s), and
    # is used for at most 300 s in all. 0: one connection per message.
    keep_connections_seconds: float = Field(default=2.0, ge=0, le=300)
    operator: str | None = None  # alerted when a message cannot be delivered

    @field_validator("operator")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        return None if value is None else _email(value)


class ImapConfig(_Model):
    """Optional fallback: poll a mailbox that receives the inbound addresses' mail."""

    host: str
    port: int = Field(default=993, ge=1, le=65535)
    tls: Literal["ssl", "starttls", "none"] = "ssl"
    ca_file: Path | None = None  # CA bundle that signs the server's certificate (else system)
    user: str
    password: SecretRef
    folder: str = "INBOX"
    processed_folder: str = "Processed"
    rejected_folder: str = "Rejected"
    poll_seconds: float = Field(default=30.0, gt=0)
    idle: bool = True  # use IDLE when the server offers it


def _networks(value: list[str]) -> list[str]:
    for net in value:
        ipaddress.ip_network(net, strict=False)
    return value


Networks = Annotated[list[str], AfterValidator(_networks)]  # IPs or CIDRs


class DefenderConfig(_Model):
    """Brute-force defence per source IP, in the manner of SFTPGo's defender."""

    enabled: bool = True
    threshold: int = Field(default=15, gt=0)  # score at which the IP is banned
    score_invalid: int = Field(default=2, ge=0)  # a failed password
    score_no_auth: int = Field(default=2, ge=0)  # a connection that never logged in
    observation_seconds: float = Field(default=1800.0, gt=0)
    ban_seconds: float = Field(default=1800.0, gt=0)
    ban_increase: float = Field(default=1.5, ge=1.0)  # each repeat ban lasts this much longer
    safelist: Networks = Field(default_factory=list)  # IPs or CIDRs never banned


class SftpConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(default=2222, ge=0, le=65535)
    host_key: Path | None = None  # default: <data_dir>/ssh_host_ed25519_key, made once
    login_timeout_seconds: float = Field(default=30.0, gt=0)
    # Temporary-named uploads never renamed (an abandoned resume) go after this long.
    temp_max_age_hours: float = Field(default=24.0, gt=0)
    defender: DefenderConfig = Field(default_factory=DefenderConfig)


class ClientSftpConfig(_Model):
    """A client's SFTP account. Passwords are stored only as a slow hash."""

    username: Identifier
    password_hash: str | None = None  # from `purlgate hash-password`
    authorized_keys: list[str] = Field(default_factory=list)  # OpenSSH public key lines
    flat: bool = False  # one project: /Uploads and /Downloads at the top
    # "close": an upload is complete when its file is closed (or a temporary name is
    # renamed); "rename": only a temporary name renamed to the final one counts.
    complete_on: Literal["close", "rename"] = "close"

    @model_validator(mode="after")
    def _some_way_in(self) -> Self:
        if self.password_hash is None and not self.authorized_keys:
            raise ValueError("give a password_hash, authorized_keys, or both")
        if self.password_hash is not None and not self.password_hash.startswith("scrypt$"):
            raise ValueError("password_hash must come from `purlgate hash-password`")
        return self


class WebConfig(_Model):
    """The region's HTTP side: what the links serve (and, later, operations)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8443, ge=0, le=65535)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # No certificate at hand (a demo, a laptop): make a self-signed one once in data_dir.
    self_signed: bool = False
    render_workers: int = Field(default=1, ge=1, le=64)  # processes drawing media
    render_queue: int = Field(default=256, ge=1)  # first views waiting; beyond: 503
    cache_dir: Path | None = None  # rendered media; default: <data_dir>/renders
    # /readyz, /metrics and the batch view: from these networks, or with the password.
    ops_networks: Networks = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    ops_user: str = "ops"
    ops_password: SecretRef | None = None

    @model_validator(mode="after")
    def _tls_pair(self) -> Self:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give both tls_cert and tls_key, or neither")
        if self.self_signed and self.tls_cert is not None:
            raise ValueError("self_signed and tls_cert exclude each other")
        return self


class StoryboardConfig(_Model):
    """The platform's render API for this region (projects with backend storyboard-api)."""

    base_url: str
    username: str
    password: SecretRef
    ca_file: Path | None = None
    concurrency: int = Field(default=8, ge=1, le=256)  # requests in flight
    requests_per_second: float = Field(default=10.0, gt=0)
    timeout_seconds: float = Field(default=30.0, gt=0)  # per HTTP request
    max_attempts: int = Field(default=5, ge=1)  # per request, on timeouts, 5xx and 429
    backoff_first_seconds: float = Field(default=1.0, ge=0)
    backoff_max_seconds: float = Field(default=60.0, gt=0)
    poll_seconds: float = Field(default=2.0, gt=0)
    render_timeout_seconds: float = Field(default=3600.0, gt=0)  # one row, ready or failed

    @field_validator("base_url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not re.fullmatch(r"https?://[^\s?#]+", value):
            raise ValueError("must be an http(s):// URL without query or fragment")
        return value.rstrip("/")


class RegionConfig(_Model):
    inbound_addresses: list[str] = Field(min_length=1)
    data_dir: Path
    public_base_url: str
    token_key: SecretRef | None = None
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    processing: ProcessingConfig = Field(default_factory=ProcessingConfig)
    pgp: PgpConfig | None = None
    smtp: SmtpConfig = Field(default_factory=SmtpConfig)
    relay: RelayConfig = Field(default_factory=RelayConfig)
    imap: ImapConfig | None = None
    sftp: SftpConfig | None = None
    web: WebConfig | None = None
    storyboard: StoryboardConfig | None = None
    # Mode of PURL, flag and error files (octal): the owner writes, its group may read.
    results_mode: Annotated[str, Field(pattern=r"^0?[0-7]{3}$")] = "0640"

    @model_validator(mode="after")
    def _render_api_alerts(self) -> Self:
        if self.storyboard is not None and self.relay.operator is None:
            raise ValueError("a storyboard (render API) section needs relay.operator: refused "
                             "credentials stop batches and the operator must hear of it")
        return self

    @field_validator("inbound_addresses")
    @classmethod
    def _emails(cls, value: list[str]) -> list[str]:
        return [_email(v) for v in value]

    @field_validator("public_base_url")
    @classmethod
    def _https(cls, value: str) -> str:
        if not re.fullmatch(r"https://[A-Za-z0-9.-]+(:\d{1,5})?(/[A-Za-z0-9._~/-]*)?", value):
            raise ValueError(
                "must be an https:// URL without query, fragment or special characters"
            )
        return value.rstrip("/")


class Config(_Model):
    regions: dict[Identifier, RegionConfig] = Field(min_length=1)
    clients: dict[Identifier, ClientConfig] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _clients_in_known_regions(self) -> Self:
        for client_id, client in self.clients.items():
            unknown = [r for r in client.regions if r not in self.regions]
            if unknown:
                raise ValueError(
                    f"client {client_id}: unknown region(s) {', '.join(unknown)}; "
                    f"known: {', '.join(self.regions)}"
                )
            if client.pgp_fingerprint is not None:
                keyless = [r for r in client.regions if self.regions[r].pgp is None]
                if keyless:
                    raise ValueError(
                        f"client {client_id} has a PGP key but region(s) {', '.join(keyless)} "
                        "have no [regions.<id>.pgp] key pair"
                    )
            for project_id, project in client.projects.items():
                if project.pgp_encrypt_output:
                    # A key that can no longer be encrypted to fails batches with "our
                    # operators have been alerted": someone must be.
                    unalerted = [r for r in client.regions
                                 if self.regions[r].relay.operator is None]
                    if unalerted:
                        raise ValueError(
                            f"client {client_id}, project {project_id} encrypts its results "
                            f"but region(s) {', '.join(unalerted)} have no relay.operator "
                            "to alert when the client's key stops working")
                if project.render.backend != "storyboard-api":
                    continue
                missing = [r for r in client.regions if self.regions[r].storyboard is None]
                if missing:
                    raise ValueError(
                        f"client {client_id}, project {project_id} renders with the "
                        f"storyboard-api but region(s) {', '.join(missing)} have no "
                        "[regions.<id>.storyboard] section"
                    )
        return self

    @model_validator(mode="after")
    def _unique_sftp_usernames(self) -> Self:
        seen: dict[str, str] = {}
        for client_id, client in self.clients.items():
            if client.sftp is None:
                continue
            other = seen.setdefault(client.sftp.username, client_id)
            if other != client_id:
                raise ValueError(f"clients {other} and {client_id} share the SFTP username "
                                 f"{client.sftp.username}")
        return self

    def region(self, region_id: str) -> RegionConfig:
        """The region ``region_id``; a ConfigError naming the configured ones if none."""
        if region_id not in self.regions:
            raise ConfigError(f"no region {region_id!r}; configured: {', '.join(self.regions)}")
        return self.regions[region_id]

    def clients_of(self, region_id: str) -> dict[str, ClientConfig]:
        return {cid: c for cid, c in self.clients.items() if region_id in c.regions}

    def client_keys(self, region_id: str) -> dict[str, tuple[Path, str]]:
        """The pinned PGP public key (file, fingerprint) of each client of the region
        that has one."""
        return {cid: (c.pgp_public_key, c.pgp_fingerprint)
                for cid, c in self.clients_of(region_id).items()
                if c.pgp_public_key is not None and c.pgp_fingerprint is not None}


def client_of_sender(sender: str, clients: Mapping[str, ClientConfig]) -> str | None:
    """The client whose registered senders include ``sender`` (case-insensitive)."""
    sender = sender.lower()
    return next((cid for cid, c in clients.items() if sender in c.senders), None)


def _where(loc: tuple[int | str, ...]) -> str:
    """Turn a pydantic location into the words an operator uses: region, client, project."""
    parts: list[str] = []
    items = list(loc)
    i = 0
    while i < len(items):
        key = items[i]
        nxt = items[i + 1] if i + 1 < len(items) else None
        if key == "regions" and nxt is not None:
            parts.append(f"region {nxt}")
            i += 2
        elif key == "clients" and nxt is not None:
            parts.append(f"client {nxt}")
            i += 2
        elif key == "projects" and nxt is not None:
            parts.append(f"project {nxt}")
            i += 2
        else:
            parts.append(f"field {key}" if isinstance(key, str) else f"item {key}")
            i += 1
    return ", ".join(parts) or "top level"


def secret_refs(config: Config) -> list[tuple[str, SecretRef]]:
    """Every secret reference in the configuration, with where it is, in the words of
    ``_where`` ("region usa, field relay.password")."""
    found: list[tuple[str, SecretRef]] = []

    def walk(value: Any, loc: tuple[int | str, ...]) -> None:
        if isinstance(value, SecretRef):
            scope: list[int | str] = []  # region / client / project, then one dotted field
            field: list[str] = []
            i = 0
            while i < len(loc):
                if loc[i] in ("regions", "clients", "projects") and i + 1 < len(loc):
                    scope += [loc[i], loc[i + 1]]
                    i += 2
                else:
                    field.append(str(loc[i]))
                    i += 1
            found.append((f"{_where(tuple(scope))}, field {'.'.join(field)}", value))
        elif isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(getattr(value, name), (*loc, name))
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, (*loc, key))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, (*loc, index))

    walk(config, ())
    return found


def parse_config(text: str, *, source: str = "<config>", base_dir: Path | None = None) -> Config:
    """Validate TOML text; every problem is listed with where it is."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            msg = str(err["msg"]).removeprefix("Value error, ")
            lines.append(f"  {_where(tuple(err['loc']))}: {msg}")
        raise ConfigError(f"{source}: {len(lines)} problem(s):\n" + "\n".join(lines)) from exc
    if base_dir is not None:
        config = _resolve_paths(config, base_dir)
    return config


def _absolute(value: Any, base_dir: Path) -> Any:
    """``value`` with every relative path in it (secret files, keys, certificates,
    templates, folders) made absolute against ``base_dir``."""
    if isinstance(value, Path):
        return value if value.is_absolute() else base_dir / value
    if isinstance(value, BaseModel):
        changed = {name: _absolute(getattr(value, name), base_dir)
                   for name in type(value).model_fields}
        return value.model_copy(update=changed)
    if isinstance(value, dict):
        return {k: _absolute(v, base_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [_absolute(v, base_dir) for v in value]
    return value


def _resolve_paths(config: Config, base_dir: Path) -> Config:
    resolved: Config = _absolute(config, base_dir)
    return resolved


def load_config(path: Path | None = None) -> Config:
    """Load ``path``, or the bundled defaults when None.

    Relative paths in a file (data directories, secret files, keys, certificates,
    templates) resolve against that file's folder, so ``--config`` works from anywhere.
    The bundled defaults resolve against the current directory: they keep their state
    in ``./var/<region>`` wherever the gateway is started.
    """
    if path is None:
        text = resources.files("purlgate").joinpath(DEFAULT_CONFIG_RESOURCE).read_text("utf-8")
        return parse_config(text, source="bundled regions.toml", base_dir=Path.cwd())
    try:
        text = path.read_text("utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text") from exc
    return parse_config(text, source=str(path), base_dir=path.absolute().parent)
