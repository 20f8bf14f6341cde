"""A draw function for the render pool's workers that runs far past any time limit (a
value that costs too much to draw, as a 10 KB name once did); importable by them."""

from __future__ import annotations

import time
from pathlib import Path

from purlgate.web.media import Canvas


def draw_forever(canvas: Canvas, target: Path) -> Path:
    time.sleep(3600)
    return target
