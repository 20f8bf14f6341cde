"""Shared set-up: a real SQLite store, the real embedded renderer, a fixed clock."""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from purlgate.config import Config, parse_config
from purlgate.core.archive import UnwrapLimits
from purlgate.core.lifecycle import BatchEvent
from purlgate.core.pipeline import BatchOutcome, BatchProcessor, Submission
from purlgate.renderers.embedded import EmbeddedRenderer
from purlgate.store import SqliteBatchStore
from tests.config_builder import region_toml


@pytest.fixture(autouse=True)
def _umask_kept() -> Iterator[None]:
    """``purlgate.cli.main`` sets the process umask to 077, as a command should; a test
    that calls it in-process must not leave it so for the servers later tests start
    (Dovecot could no longer read its passwd file)."""
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


@pytest.fixture(autouse=True)
def _logging_kept() -> Iterator[None]:
    """``purlgate.cli.main`` sets up logging as a command should (one handler on the
    root logger, writing to the stderr of the moment); a test that calls it in-process
    must not leave that handler writing to a stream pytest has closed since."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(autouse=True)
def _database(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite's PostgreSQL pass (``PURLGATE_TEST_BACKEND=postgres``, see .ci/run):
    every region a test configures (tests/config_builder.py) keeps its batches, ledgers
    and leases in a fresh database of the test's own, on the real server pg_helpers
    starts. The default pass uses the embedded SQLite backend."""
    if os.environ.get("PURLGATE_TEST_BACKEND") == "postgres":
        monkeypatch.setenv("PURLGATE_DATABASE_URL", request.getfixturevalue("pg_url"))


# Fixtures shared by several test modules live with their helpers.
pytest_plugins = ["tests.sftp_helpers", "tests.pg_helpers", "tests.dns_helpers"]

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "fixtures" / "data"
KEY = bytes(range(32))
BASE_URL = "https://purl.test"

TEST_CONFIG = region_toml() + """[clients.acme]
name = "Acme"
regions = ["usa"]
senders = ["data@acme.example"]
notify = ["ops@acme.example"]

[clients.acme.projects.spring]
keep_all_columns = true

[clients.acme.projects.agreed]
keep_all_columns = false
columns = [
  { name = "first_name", required = true },
  { name = "email", required = true },
  { name = "city" },
]

[clients.acme.projects.agreed-all]
keep_all_columns = true
columns = [{ name = "email", required = true }]

[clients.acme.projects.strict]
encoding = "utf-8"
delimiter = ";"
purl_prefix = "OUT_"
purl_suffix = "_v1"
error_file = false
flag_file = false

[clients.globex]
name = "Globex"
regions = ["usa"]

[clients.globex.projects.main]
"""


@pytest.fixture
def config() -> Config:
    return parse_config(TEST_CONFIG)


def fixed_clock() -> datetime:
    return datetime(2026, 11, 27, 10, 15, 0, tzinfo=UTC)


@dataclass
class Harness:
    processor: BatchProcessor
    store: SqliteBatchStore
    out: Path
    events: list[BatchEvent]
    tmp: Path

    def run(self, path: Path, *, client: str | None = "acme", project: str | None = "spring",
            name: str | None = None, **extra: object) -> BatchOutcome:
        sub = Submission(path=path, received_name=name or path.name, channel="test",
                         client_id=client, project_id=project, **extra)  # type: ignore[arg-type]
        return self.processor.process(sub, self.out)

    def fixture(self, name: str, **kw: object) -> BatchOutcome:
        return self.run(DATA / name, **kw)  # type: ignore[arg-type]

    def write(self, name: str, data: bytes) -> Path:
        path = self.tmp / "in" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        return path

    def outputs(self) -> list[str]:
        return sorted(p.name for p in self.out.iterdir())


def make_harness(config: Config, tmp: Path, **limits: int | float) -> Harness:
    store = SqliteBatchStore(tmp / "state" / "batches.sqlite3")
    events: list[BatchEvent] = []
    out = tmp / "out"
    out.mkdir(parents=True, exist_ok=True)
    renderer = EmbeddedRenderer(KEY, BASE_URL)
    processor = BatchProcessor(
        region_id="usa",
        clients=config.clients_of("usa"),
        limits=UnwrapLimits(
            max_uncompressed_bytes=int(limits.get("max_bytes", 10 * 1024 * 1024)),
            max_compression_ratio=float(limits.get("max_ratio", 100.0)),
            ratio_check_after_bytes=int(limits.get("ratio_after", 64 * 1024)),
        ),
        store=store,
        renderer_for=lambda client, project: renderer,
        clock=fixed_clock,
        work_root=tmp / "work",
        subscribers=[events.append],
    )
    return Harness(processor, store, out, events, tmp)


@pytest.fixture
def harness(config: Config, tmp_path: Path) -> Harness:
    return make_harness(config, tmp_path)


@pytest.fixture
def harness_factory(config: Config, tmp_path: Path) -> Callable[..., Harness]:
    return lambda **limits: make_harness(config, tmp_path, **limits)


def read_csv(path: Path, encoding: str = "utf-8", delimiter: str = ",") -> list[list[str]]:
    with path.open(encoding=encoding, newline="") as f:
        return list(csv.reader(f, delimiter=delimiter))


def parse_csv(text: str, delimiter: str = ",") -> list[list[str]]:
    return list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))


def scratch_data_left(work: Path) -> list[str]:
    """What batches left under a scratch root that holds data: a file with content, or
    anything beside the threads' own scratch folders (whose files stay, emptied, for
    the next batch: see core.files.clear_scratch)."""
    if not work.exists():
        return []
    stray = [p.name for p in work.iterdir()
             if not (p.is_dir() and p.name.startswith("t") and "-" in p.name)]
    full = [str(p.relative_to(work)) for p in work.rglob("*")
            if p.is_file() and p.stat().st_size]
    return stray + full
