"""Qwen-VL grounding markup: <ref>text</ref><box>(x1,y1),(x2,y2)</box>, coordinates in [0, 1000)
relative to the picture; parsing, IoU and drawing the boxes back onto the picture."""

from __future__ import annotations

import re
from dataclasses import dataclass

from PIL import Image, ImageDraw

_ITEM = re.compile(r"<ref>(.*?)</ref>|<box>\((-?\d+),(-?\d+)\),\((-?\d+),(-?\d+)\)</box>", re.DOTALL)

Box = tuple[int, int, int, int]


@dataclass
class Grounding:
    ref: str | None
    box: Box


def parse_boxes(text: str) -> list[Grounding]:
    """Every box in reading order, each with the latest <ref> before it (None if there was none)."""
    found: list[Grounding] = []
    ref: str | None = None
    for m in _ITEM.finditer(text):
        if m.group(1) is not None:
            ref = m.group(1)
        else:
            found.append(Grounding(ref, tuple(int(v) for v in m.groups()[1:])))  # type: ignore[arg-type]
    return found


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes (corners in any order)."""
    ax1, ax2 = sorted((a[0], a[2]))
    ay1, ay2 = sorted((a[1], a[3]))
    bx1, bx2 = sorted((b[0], b[2]))
    by1, by2 = sorted((b[1], b[3]))
    iw = max(0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def to_pixels(box: Box, width: int, height: int) -> Box:
    return (
        int(box[0] / 1000 * width),
        int(box[1] / 1000 * height),
        int(box[2] / 1000 * width),
        int(box[3] / 1000 * height),
    )


def draw_boxes(image: Image.Image, boxes: list[Grounding], width: int = 3) -> Image.Image:
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
