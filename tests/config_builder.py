"""One builder for the tests' configurations: the ``[regions.<id>]`` block and its tables,
written from only what a test changes."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from purlgate.logs import instance_name


class Raw(str):
    """Written into the TOML as it is: a ``str.format`` placeholder such as
    ``"{relay_port}"`` where a number goes, filled in later by the test."""


def toml_value(value: object) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string (braces kept: format placeholders)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML for {value!r}")


def region_toml(region: str = "usa", *, data_dir: str = "var/usa",
                public_base_url: str = "https://purl.test",
                inbound: list[str] | None = None,
                **tables: Mapping[str, object] | str) -> str:
    """``[regions.<region>]`` with its addresses, data folder and links, then one table per
    keyword (``smtp={"port": 0}`` is ``[regions.usa.smtp]``; ``sftp__defender`` is
    ``[regions.usa.sftp.defender]``; a table given as text is written as it is)."""
    lines = [f"[regions.{region}]",
             f"inbound_addresses = {toml_value(inbound or [f'sftp-{region}@idomoo.com'])}",
             f"data_dir = {toml_value(data_dir)}",
             f"public_base_url = {toml_value(public_base_url)}"]
    if os.environ.get("PURLGATE_TEST_BACKEND") == "postgres" and "database" not in tables:
        # The suite's PostgreSQL pass: every region on the test's own database (conftest).
        # A table, not an inline one: some tests str.format() the text (no braces).
        tables = {**tables, "database__url": {"env": "PURLGATE_DATABASE_URL"}}
    if os.environ.get("PURLGATE_TEST_DNS") and "dns" not in tables:
        # The suite's own DNS server (tests/dns_helpers.py): sender checks stay offline.
        tables = {**tables, "dns": {"servers": [os.environ["PURLGATE_TEST_DNS"]],
                                    "timeout_seconds": 2}}
    for name, table in tables.items():
        lines += ["", f"[regions.{region}.{name.replace('__', '.')}]"]
        if isinstance(table, str):
            lines.append(table)
            continue
        lines += [f"{key} = {toml_value(value)}" for key, value in table.items()]
    return "\n" + "\n".join(lines) + "\n\n"


def own(folder: Path) -> Path:
    """This instance's part of a scratch or staging folder: the folder itself, or in
    the suite's PostgreSQL pass (a region with a database, whose instances share its
    data_dir) the subfolder named after the instance."""
    if os.environ.get("PURLGATE_TEST_BACKEND") == "postgres":
        return folder / instance_name()
    return folder
