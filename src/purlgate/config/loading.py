"""Reading regions.toml: the only code that reads configuration files. Every problem
is listed with where it is, in an operator's words ("region usa, field smtp, field
port: ..."); relative paths resolve against the file's folder."""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from purlgate.config.regions import Config
from purlgate.config.secrets import SecretRef
from purlgate.errors import ConfigError

DEFAULT_CONFIG_RESOURCE = "regions.toml"


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
