"""A project's landing-page template: landing.html, template.toml and static/.

Every string a template shows comes from Jinja2 in a sandbox (an immutable sandboxed
environment: no attribute tricks, no mutation), HTML with autoescape on, so a row's
values can never become markup or script. ``template.toml`` is the template's own
description (sizes, colours, texts), read here and validated like the configuration.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import FileSystemLoader, TemplateError, Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from purlgate.errors import ConfigError
from purlgate.renderers.columns import NAME_COLUMNS, loose
from purlgate.web.media import Canvas, Text

_SAFE_URL = re.compile(r"^https?://[^\s\"'<>]+$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TextSpec(_Model):
    text: str
    size: int = Field(default=32, ge=6, le=400)
    color: str = "#ffffff"
    x: int = Field(default=40, ge=0)
    y: int = Field(default=40, ge=0)
    appear: float = Field(default=0.0, ge=0)


class PageSpec(_Model):
    lang: str = "en"
    title: str = "Your personal video"
    heading: str = ""
    text: str = ""
    cta_text: str = "Find out more"
    cta_url: str = ""


class PictureSpec(_Model):
    width: int = Field(default=640, ge=16, le=3840)
    height: int = Field(default=360, ge=16, le=2160)
    background: str = "#16324f"
    accent: str = "#f4a259"
    font: str | None = None  # a font file inside the template folder
    play_button: bool = False
    text: list[TextSpec] = Field(default_factory=list)


class VideoSpec(PictureSpec):
    width: int = Field(default=1280, ge=16, le=3840)
    height: int = Field(default=720, ge=16, le=2160)
    fps: int = Field(default=25, ge=1, le=60)
    seconds: float = Field(default=4.0, gt=0, le=60)


class TemplateSpec(_Model):
    page: PageSpec = Field(default_factory=PageSpec)
    thumbnail: PictureSpec = Field(default_factory=PictureSpec)
    video: VideoSpec = Field(default_factory=VideoSpec)


def greeting_name(row: Mapping[str, str]) -> str:
    """The value a greeting uses: the first name-like column, matched loosely."""
    by_key = {loose(k): v for k, v in row.items()}
    for key in NAME_COLUMNS:
        value = by_key.get(key)
        if value and value.strip():
            return value.strip().split()[0] if key in ("name", "full_name") else value.strip()
    return ""


@dataclass(frozen=True)
class Rendered:
    """One row's page strings and media canvases, resolved against the template."""

    page: dict[str, str]
    thumbnail: Canvas
    video: Canvas


class Template:
    """A loaded template folder; ``key`` names its version (assets and render cache)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        try:
            raw = tomllib.loads((folder / "template.toml").read_text("utf-8"))
            self.spec = TemplateSpec.model_validate(raw)
            html = (folder / "landing.html").read_text("utf-8")
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, ValidationError) as exc:
            raise ConfigError(f"template {folder}: {exc}") from exc
        self.static = folder / "static"
        digest = hashlib.sha256(html.encode())
        digest.update(str(sorted(raw.items())).encode())
        self._fonts: dict[str, str] = {}
        for font in (self.spec.thumbnail.font, self.spec.video.font):
            if font is not None and font not in self._fonts:
                path = self._font_path(font)
                digest.update(path.read_bytes())
                self._fonts[font] = str(path)
        self.key = digest.hexdigest()[:12]
        self._html_env = ImmutableSandboxedEnvironment(
            loader=FileSystemLoader(folder), autoescape=True, undefined=Undefined)
        self._text_env = ImmutableSandboxedEnvironment(autoescape=False, undefined=Undefined)
        try:
            self._page = self._html_env.get_template("landing.html")
            # Compiled once: a syntax error stops the start, not a page view.
            self._compiled = {text: self._text_env.from_string(text)
                              for text in self._texts()}
        except TemplateError as exc:
            raise ConfigError(f"template {folder}: {exc}") from exc

    def _font_path(self, font: str) -> Path:
        path = (self.folder / font).resolve()
        if not path.is_relative_to(self.folder.resolve()) or not path.is_file():
            raise ConfigError(f"template {self.folder}: font {font!r} is not a file inside it")
        return path

    def _texts(self) -> list[str]:
        s = self.spec
        return [s.page.lang, s.page.title, s.page.heading, s.page.text, s.page.cta_text,
                s.page.cta_url,
                *(t.text for t in s.thumbnail.text), *(t.text for t in s.video.text)]

    def _text(self, source: str, context: Mapping[str, Any]) -> str:
        try:
            return self._compiled[source].render(context).strip()
        except TemplateError:
            return ""  # a template that fails on one row's values shows nothing there

    def _canvas(self, spec: PictureSpec, context: Mapping[str, Any]) -> Canvas:
        video = spec if isinstance(spec, VideoSpec) else None
        return Canvas(
            width=spec.width, height=spec.height, background=spec.background,
            accent=spec.accent, play_button=spec.play_button,
            font=self._fonts[spec.font] if spec.font else None,
            texts=tuple(Text(self._text(t.text, context), t.size, t.color, t.x, t.y, t.appear)
                        for t in spec.text),
            fps=video.fps if video else 25, seconds=video.seconds if video else 4.0,
        )

    def resolve(self, row: Mapping[str, str]) -> Rendered:
        context = {"row": dict(row), "name": greeting_name(row)}
        p = self.spec.page
        page = {k: self._text(getattr(p, k), context)
                for k in ("lang", "title", "heading", "text", "cta_text", "cta_url")}
        if not _SAFE_URL.match(page["cta_url"]):
            page["cta_url"] = ""  # only a plain http(s) link becomes a button
        return Rendered(page, self._canvas(self.spec.thumbnail, context),
                        self._canvas(self.spec.video, context))

    def page_html(self, rendered: Rendered, *, row: Mapping[str, str], video_url: str,
                  thumbnail_url: str, static_url: str) -> str:
        return self._page.render(
            page=rendered.page, row=dict(row), name=greeting_name(row), video_url=video_url,
            thumbnail_url=thumbnail_url, static=lambda path: f"{static_url}/{path}",
        )
