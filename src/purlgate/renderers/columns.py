"""Which of a row's columns a project's landing page and media read: all the row store
keeps of it (the rest of the row is in the client's PURL file, and nowhere else here).

A project lists them (``render.keep_columns``), or they are read off its template: every
string of ``template.toml`` and ``landing.html`` is parsed as Jinja, and ``row.X``,
``row["X"]`` and ``row.get("X")`` name column X; ``name`` (the greeting) needs the
name-like columns (``NAME_COLUMNS``, matched loosely). A template that uses ``row`` any
other way (a loop over it, a computed key) keeps every column: nothing it might show is
dropped.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import Environment, TemplateSyntaxError, nodes

from purlgate.errors import ConfigError

# What the greeting (``name``) reads: the first of these found, matched loosely.
NAME_COLUMNS = ("first_name", "firstname", "first", "given_name", "name", "full_name")
_ROW_METHODS = frozenset({"get", "items", "keys", "values"})


def loose(column: str) -> str:
    """A column name as the greeting matches it: case, spaces and dashes aside."""
    return re.sub(r"[\s_-]+", "_", column.strip().casefold())


def default_template_dir() -> Path:
    """The bundled landing page, thumbnail and video (inside the web side's package)."""
    return Path(__file__).resolve().parents[1] / "web" / "default_template"


@dataclass(frozen=True)
class RowColumns:
    names: frozenset[str] | None  # None: every column
    greeting: bool = False  # and the name-like ones

    def select(self, columns: Sequence[str]) -> list[str]:
        """The columns of ``columns`` to keep, in their order."""
        if self.names is None:
            return list(columns)
        return [c for c in columns
                if c in self.names or (self.greeting and loose(c) in NAME_COLUMNS)]


EVERY_COLUMN = RowColumns(None)


def template_columns(folder: Path | None) -> RowColumns:
    """What the template in ``folder`` (None: the bundled one) reads of a row."""
    folder = folder or default_template_dir()
    try:
        sources = [(folder / "landing.html").read_text("utf-8"),
                   *_strings(tomllib.loads((folder / "template.toml").read_text("utf-8")))]
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"template {folder}: {exc}") from exc
    env = Environment(autoescape=True)
    names: set[str] = set()
    greeting = False
    for source in sources:
        try:
            tree = env.parse(source)
        except TemplateSyntaxError:
            return EVERY_COLUMN  # the template's own check says what is wrong
        found = _reads(tree)
        if found is None:
            return EVERY_COLUMN
        names |= found
        greeting = greeting or any(n.name == "name" and n.ctx == "load"
                                   for n in tree.find_all(nodes.Name))
    return RowColumns(frozenset(names), greeting)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _reads(tree: nodes.Node) -> set[str] | None:
    """The columns ``tree`` reads through ``row``; None when it uses ``row`` otherwise."""
    found: set[str] = set()
    uses = [0, 0]  # every load of ``row``, and those understood

    def walk(node: nodes.Node, parent: nodes.Node | None) -> None:
        if isinstance(node, nodes.Name) and node.name == "row" and node.ctx == "load":
            uses[0] += 1
            column = _column(node, parent)
            if column is not None:
                found.add(column)
                uses[1] += 1
        for child in node.iter_child_nodes():
            walk(child, node)

    def _column(row: nodes.Name, parent: nodes.Node | None) -> str | None:
        if isinstance(parent, nodes.Getattr) and parent.node is row:
            if parent.attr not in _ROW_METHODS:
                return parent.attr
            get = parents.get(id(parent))
            if parent.attr == "get" and isinstance(get, nodes.Call) and get.node is parent \
                    and get.args and isinstance(get.args[0], nodes.Const) \
                    and isinstance(get.args[0].value, str):
                return get.args[0].value
            return None
        if isinstance(parent, nodes.Getitem) and parent.node is row \
                and isinstance(parent.arg, nodes.Const) and isinstance(parent.arg.value, str):
            return parent.arg.value
        return None

    parents: dict[int, nodes.Node] = {}
    for node in tree.find_all(nodes.Node):
        for child in node.iter_child_nodes():
            parents[id(child)] = node
    walk(tree, None)
    return found if uses[0] == uses[1] else None
