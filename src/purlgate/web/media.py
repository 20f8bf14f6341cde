"""Draw a row's thumbnail (JPEG) and video (H.264 MP4) from a resolved template spec.

Pure work on plain data: the web side resolves the template's strings against the row
and hands these functions a ``Canvas`` (sizes, colours, texts, font) and a target path;
they run in the render process pool, never on the event loop. Each writes a hidden
temporary file and renames it into place, so a reader never sees half a render.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageColor, ImageDraw, ImageFont

JPEG_QUALITY = 85


@dataclass(frozen=True)
class Text:
    text: str
    size: int
    color: str
    x: int
    y: int
    appear: float = 0.0  # video only: seconds before it fades in


@dataclass(frozen=True)
class Canvas:
    width: int
    height: int
    background: str
    accent: str
    texts: tuple[Text, ...] = field(default=())
    font: str | None = None  # a TrueType/OpenType file; None: Pillow's built-in font
    play_button: bool = False
    fps: int = 25
    seconds: float = 4.0


@functools.lru_cache(maxsize=64)
def _font(path: str | None, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if path:
        return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)


# No line of a picture shows more characters than this, so a longer value is cut
# before it is measured: a 10 KB first name costs what a short one does.
MAX_DRAWN_CHARS = 256


def _fit(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, room: int) -> str:
    """Cut a long value with an ellipsis so that it stays inside the picture: the
    longest start of it that fits beside the ellipsis, found by halving (a dozen
    measurements, not one per character)."""
    text = text[:MAX_DRAWN_CHARS]
    if font.getlength(text) <= room:
        return text
    fits, too_long = 0, len(text)  # text[:fits] + "…" fits; text[:too_long] + "…" may not
    while too_long - fits > 1:
        middle = (fits + too_long) // 2
        if font.getlength(text[:middle] + "…") <= room:
            fits = middle
        else:
            too_long = middle
    return text[:fits] + "…"


def _draw_frame(canvas: Canvas, at: float | None) -> Image.Image:
    """One picture; ``at`` is the video time (None: the still thumbnail, all texts)."""
    image = Image.new("RGB", (canvas.width, canvas.height), canvas.background)
    draw = ImageDraw.Draw(image)
    bar = max(4, canvas.height // 60)
    draw.rectangle((0, canvas.height - bar, canvas.width, canvas.height), fill=canvas.accent)
    for item in canvas.texts:
        if at is not None and at < item.appear:
            continue
        font = _font(canvas.font, item.size)
        color = item.color
        if at is not None and at < item.appear + 0.5:  # a half-second fade in
            color = _blend(canvas.background, item.color, (at - item.appear) / 0.5)
        draw.text((item.x, item.y), _fit(item.text, font, canvas.width - item.x - 20),
                  font=font, fill=color)
    if at is not None:  # progress along the bottom bar
        done = int(canvas.width * min(1.0, at / canvas.seconds))
        draw.rectangle((0, canvas.height - bar, done, canvas.height), fill="#ffffff")
    if canvas.play_button:
        r = canvas.height // 7
        cx, cy = canvas.width - 2 * r, canvas.height - 2 * r
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=canvas.accent)
        draw.polygon([(cx - r // 3, cy - r // 2), (cx - r // 3, cy + r // 2),
                      (cx + r // 2, cy)], fill="#ffffff")
    return image


def _blend(a: str, b: str, t: float) -> str:
    ca, cb = ImageColor.getrgb(a)[:3], ImageColor.getrgb(b)[:3]
    t = max(0.0, min(1.0, t))
    return "#" + "".join(f"{round(x + (y - x) * t):02x}" for x, y in zip(ca, cb, strict=True))


def _temp_for(target: Path) -> Path:
    # Unique across instances sharing the cache folder too (containers' pids repeat).
    return target.with_name(f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.part")


def render_thumbnail(canvas: Canvas, target: Path) -> Path:
    """The still thumbnail as a baseline JPEG (what every email client shows)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_for(target)
    try:
        _draw_frame(canvas, None).save(temp, "JPEG", quality=JPEG_QUALITY, optimize=True)
        temp.replace(target)
    finally:
        temp.unlink(missing_ok=True)
    return target


def render_video(canvas: Canvas, target: Path) -> Path:
    """A short H.264 (yuv420p) MP4 with the index up front, so browsers play at once."""
    # FFmpeg is large: only the render processes load it, never the server or the core.
    import av  # noqa: PLC0415
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_for(target)
    try:
        with av.open(str(temp), "w", format="mp4", options={"movflags": "+faststart"}) as out:
            stream = out.add_stream("libx264", rate=canvas.fps)
            stream.width, stream.height = canvas.width, canvas.height
            stream.pix_fmt = "yuv420p"
            stream.options = {"preset": "veryfast", "crf": "26", "tune": "stillimage"}
            frames = max(1, round(canvas.seconds * canvas.fps))
            for i in range(frames):
                frame = av.VideoFrame.from_image(_draw_frame(canvas, i / canvas.fps))  # type: ignore[no-untyped-call]
                out.mux(stream.encode(frame))
            out.mux(stream.encode(None))
        temp.replace(target)
    finally:
        temp.unlink(missing_ok=True)
    return target


def warm_up() -> None:
    """Run once in each render process: load the default font and FFmpeg's encoder."""
    import av  # noqa: PLC0415 - see render_video

    ImageFont.load_default(size=12)
    av.codec.Codec("libx264", "w")
