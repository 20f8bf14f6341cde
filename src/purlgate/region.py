"""A region's batch core, built from the configuration: store, renderers, row store, keys.

What ``purlgate process`` and every channel share, and nothing more: no channel, no
server and no web library is imported here, so the core's commands start fast and small.
``mail_side.py`` builds the email side around it and ``app.py`` the rest (listeners, web).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from purlgate.config import Config, RegionConfig
from purlgate.core.archive import UnwrapLimits
from purlgate.core.leases import Leases, LocalLeases
from purlgate.core.lifecycle import RegionStore
from purlgate.core.pipeline import BatchProcessor, Subscriber
from purlgate.core.render import Renderer, RenderLedgerPort
from purlgate.errors import ConfigError
from purlgate.logs import instance_name
from purlgate.pgp import GpgKeyStore
from purlgate.renderers.columns import EVERY_COLUMN, RowColumns, template_columns
from purlgate.renderers.embedded import EmbeddedRenderer, load_or_create_key, parse_key
from purlgate.rowstore import ArrowRowStore, Keep
from purlgate.store import SqliteBatchStore

if TYPE_CHECKING:
    from purlgate.postgres import PgDatabase, PgMailLedger


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 1 << 20


def use_system_allocator() -> None:
    """Arrow's buffers from glibc's malloc, with blocks of 1 MiB and more mapped on
    their own (``M_MMAP_THRESHOLD`` fixed: glibc's own threshold rises as big blocks are
    freed, and then leaves them in the heap): a batch's blocks go back to the system as
    they are freed, and ``malloc_trim`` after an entry returns the rest. Measured on a
    300,000-row batch: 1 MB held afterwards, where Arrow's jemalloc pool held 38-60 MB
    until later allocations went by (an idle worker makes none); at 1M rows a peak RSS
    of 165-168 MB against jemalloc's 161-164, 1.13-1.22 s against 1.11-1.17. Not
    glibc: Arrow's default pool."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):
        return
    pa.set_memory_pool(pa.system_memory_pool())


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Backend:
    """Where a region keeps what its instances agree on: SQLite in ``data_dir`` (one
    instance, the embedded default) or the region's PostgreSQL (``[database]``, any
    number of instances sharing ``data_dir``)."""

    store: RegionStore
    leases: Leases
    database: PgDatabase | None = None  # None: embedded
    mail_ledger: PgMailLedger | None = None  # None: the mail worker's SQLite one
    render_ledger: RenderLedgerPort | None = None  # None: the renderer's SQLite one

    @property
    def shared(self) -> bool:
        """Other instances may work in the same ``data_dir``."""
        return self.database is not None

    def scratch(self, folder: Path) -> Path:
        """This instance's own part of a scratch or staging ``folder``: the folder
        itself when it is the only instance, else a subfolder named after it (what one
        instance sweeps at start must never be another's work in progress)."""
        return folder / self.leases.instance if self.shared else folder

    def close(self) -> None:
        if self.database is not None:
            self.database.close()


def open_backend(region_id: str, region: RegionConfig, data_dir: Path, *,
                 migrate: bool = True) -> Backend:
    instance = instance_name()
    if region.database is None:
        return Backend(SqliteBatchStore(data_dir / "batches.sqlite3", instance=instance),
                       LocalLeases(instance))
    # psycopg loads only in regions that have a database.
    from purlgate.postgres import (  # noqa: PLC0415
        PgBatchStore,
        PgDatabase,
        PgLeases,
        PgMailLedger,
        PgRenderLedger,
    )
    settings = region.database
    db = PgDatabase(settings.url.reveal().decode(), region=region_id, instance=instance,
                    pool_size=settings.pool_size,
                    connect_timeout=settings.connect_timeout_seconds, migrate_schema=migrate)
    return Backend(PgBatchStore(db), PgLeases(db, settings.lease_seconds), db,
                   PgMailLedger(db), PgRenderLedger(db))


@dataclass(frozen=True)
class Region:
    id: str
    config: RegionConfig
    data_dir: Path
    store: RegionStore
    processor: BatchProcessor
    rows: ArrowRowStore
    token_key: bytes
    backend: Backend
    keys: GpgKeyStore | None = None
    ledger: RenderLedgerPort | None = None

    def close(self) -> None:
        self.rows.close()
        if self.ledger is not None:
            self.ledger.close()
        if self.keys is not None:
            self.keys.close()
        self.backend.close()


def token_key(region: RegionConfig, data_dir: Path) -> bytes:
    if region.token_key is not None:
        return parse_key(region.token_key.reveal())
    return load_or_create_key(data_dir / "token.key")


def rows_key(region: RegionConfig, data_dir: Path) -> bytes:
    """The key the row store is sealed with, kept like the token key."""
    if region.rows_key is not None:
        return parse_key(region.rows_key.reveal(), what="rows key")
    return load_or_create_key(data_dir / "rows.key", what="rows key")


def row_columns(config: Config, region_id: str) -> Keep:
    """What the row store keeps of each project's rows: the columns listed in its
    config, else those its template reads (``renderers/columns.py``)."""
    read: dict[Path | None, RowColumns] = {}
    kept: dict[tuple[str, str], RowColumns] = {}
    for client_id, client in config.clients_of(region_id).items():
        for project_id, project in client.projects.items():
            render = project.render
            if render.keep_columns is not None:
                kept[client_id, project_id] = RowColumns(frozenset(render.keep_columns))
            elif render.backend == "embedded":
                if render.template not in read:
                    read[render.template] = template_columns(render.template)
                kept[client_id, project_id] = read[render.template]
    return lambda client, project, columns: kept.get(
        (client, project), EVERY_COLUMN).select(columns)


def build_region(
    config: Config,
    region_id: str,
    *,
    data_dir: Path | None = None,
    subscribers: Sequence[Subscriber] = (),
) -> Region:
    region = config.region(region_id)
    use_system_allocator()
    data_dir = data_dir or region.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    data_dir.chmod(0o700)  # client data lives here: spools, rows, keys, results
    backend = open_backend(region_id, region, data_dir)
    key = token_key(region, data_dir)
    embedded = EmbeddedRenderer(key, region.public_base_url)
    rows = ArrowRowStore(data_dir / "rows", key=rows_key(region, data_dir),
                         keep=row_columns(config, region_id))
    clients = config.clients_of(region_id)

    api = None
    if region.storyboard is not None:
        # The render API's client (aiohttp) loads only in regions that use it.
        from purlgate.renderers.storyboard import (  # noqa: PLC0415
            StoryboardRenderer,
            build_storyboard_renderers,
        )
        api = build_storyboard_renderers(region.storyboard, region_id, data_dir,
                                         backend.render_ledger)
    made: dict[tuple[str, str], Renderer] = {}

    def renderer_for(client_id: str, project_id: str) -> Renderer:
        settings = clients[client_id].projects[project_id].render
        if settings.backend == "embedded":
            return embedded
        if api is None or region.storyboard is None or settings.storyboard_id is None:
            raise ConfigError(f"region {region_id} has no [regions.{region_id}.storyboard]")
        if (client_id, project_id) not in made:
            ledger, limiter, password, context = api
            made[client_id, project_id] = StoryboardRenderer(
                config=region.storyboard, password=password,
                storyboard_id=settings.storyboard_id, fields=settings.fields,
                region=region_id, ledger=ledger, limiter=limiter, ssl_context=context)
        return made[client_id, project_id]

    limits = UnwrapLimits(**region.limits.model_dump())
    keys = None
    if region.pgp is not None:
        keys = GpgKeyStore.open(region.pgp, data_dir, config.client_keys(region_id))
    processor = BatchProcessor(
        region_id=region_id, clients=clients, limits=limits, store=backend.store,
        renderer_for=renderer_for, clock=utc_now,
        work_root=backend.scratch(data_dir / "work"),
        subscribers=subscribers, crypto=keys, rows=rows,
        result_mode=int(region.results_mode, 8),
    )
    return Region(region_id, region, data_dir, backend.store, processor, rows, key, backend, keys,
                  api[0] if api is not None else None)
