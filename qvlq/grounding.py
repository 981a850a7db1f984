"""Qwen-VL grounding markup: <ref>text</ref><box>(x1,y1),(x2,y2)</box>, coordinates in [0, 1000)
relative to the picture; parsing, IoU and drawing the boxes back onto the picture."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

from PIL import Image, ImageDraw

Box = tuple[int, int, int, int]


class GroundedBox(NamedTuple):
    ref: str | None
    box: Box


_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_GROUNDING_RE = re.compile(
    rf"<ref>(?P<ref>.*?)</ref>|<box>\s*\({_NUM},{_NUM}\)\s*,\s*\({_NUM},{_NUM}\)\s*</box>", re.DOTALL
)


def parse_boxes(text: str) -> list[GroundedBox]:
    """All ``<box>(x1,y1),(x2,y2)</box>`` in ``text``, in order, each with the latest preceding
    ``<ref>`` text (None if there is none). Tolerates spaces and decimals (rounded to int)."""
    out: list[GroundedBox] = []
    ref: str | None = None
    for m in _GROUNDING_RE.finditer(text):
        if m.group("ref") is not None:
            ref = m.group("ref").strip()
            continue
        x1, y1, x2, y2 = (round(float(v)) for v in m.groups()[1:])
        out.append(GroundedBox(ref, (x1, y1, x2, y2)))
    return out


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; corners may come in either order.
    Two identical zero-area boxes give 1.0, other zero-area unions 0.0."""
    ax1, ax2 = sorted((a[0], a[2]))
    ay1, ay2 = sorted((a[1], a[3]))
    bx1, bx2 = sorted((b[0], b[2]))
    by1, by2 = sorted((b[1], b[3]))
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    if union <= 0:
        return 1.0 if (ax1, ay1, ax2, ay2) == (bx1, by1, bx2, by2) else 0.0
    return float(inter / union)


def to_pixels(box: Box, width: int, height: int) -> Box:
    return (
        int(box[0] / 1000 * width),
        int(box[1] / 1000 * height),
        int(box[2] / 1000 * width),
        int(box[3] / 1000 * height),
    )


def draw_boxes(image: Image.Image, boxes: list[GroundedBox], width: int = 3) -> Image.Image:
    """A copy of `image` with every box drawn and labelled with its ref."""
    img = image.convert("RGB").copy()
    draw = ImageDraw.Draw(img)
    palette = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4"]
    for i, g in enumerate(boxes):
        color = palette[i % len(palette)]
        x1, y1, x2, y2 = to_pixels(g.box, *img.size)
        draw.rectangle((min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)), outline=color, width=width)
        if g.ref:
            draw.text((min(x1, x2) + 3, min(y1, y2) + 2), g.ref, fill=color)
    return img
