"""TouchStone's data: the TSV (columns index, image, question, human_annotation, gpt4_ha_answer, category,
task_name), one item per row, and the slices `qvlq compare` runs on.

The public README decodes `image` as one base64 string per row; how the real file stores the several pictures
of a multi-image row is UNCONFIRMED, so `split_image_cell` accepts every plausible encoding: one base64
string; a JSON (or Python-literal) list of base64 strings, as VLMEvalKit-style TSVs write them and as qvlq
writes them; base64 strings separated by `,`, `;`, `|` or newlines/spaces (none of which is in the base64
alphabet; a whitespace-wrapped single string is told apart from several strings by each piece starting with
an image signature); `data:image/...;base64,` prefixes are removed. `category` may be a comma-separated
list: the item counts in each category. Language: a question with at least one Han ideograph (CJK Unified
Ideographs, Extension A or Compatibility) is zh, otherwise en. An item's uid is
`{index}-{sha256(question, image cell)[:12]}`.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import hashlib
import io
import json
import os
import random
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .tokenizer import from_list_format

TSV_COLUMNS = ("index", "image", "question", "human_annotation", "gpt4_ha_answer", "category", "task_name")
LANGS = ("en", "zh")


class TouchStoneError(ValueError):
    """A TouchStone file, cell or slice that cannot be used, with a one-line reason."""


_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_DATA_URI = re.compile(r"data:[\w.+/-]*;base64,")
_SEPARATORS = re.compile(r"[,;|]")
_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")


def detect_lang(text: str) -> str:
    """zh when the text holds a Han ideograph, else en."""
    return "zh" if _HAN.search(text) else "en"


def _b64decode(s: str) -> bytes:
    s = "".join(s.split())
    s += "=" * (-len(s) % 4)
    if "-" in s or "_" in s:
        return base64.urlsafe_b64decode(s)
    return base64.b64decode(s, validate=True)


def _looks_like_image(piece: str) -> bool:
    try:
        head = _b64decode(piece[:24])
    except (binascii.Error, ValueError):
        return False
    return head.startswith(_MAGIC)


def split_image_cell(cell: str) -> list[str]:
    """The base64 strings of one `image` cell (see the module docstring for the accepted encodings)."""
    s = cell.strip()
    if not s:
        return []
    if s.startswith("["):
        try:
            parts = json.loads(s)
        except json.JSONDecodeError:
            try:
                parts = ast.literal_eval(s)
            except (ValueError, SyntaxError):
                raise TouchStoneError("image cell starts with '[' but is not a list of base64 strings") from None
        if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
            raise TouchStoneError("image cell list must hold base64 strings")
        pieces = [p.strip() for p in parts]
    else:
        pieces = [p.strip() for p in _SEPARATORS.split(_DATA_URI.sub(",", s))]
    out: list[str] = []
    for p in pieces:
        p = _DATA_URI.sub("", p).strip()
        if not p:
            continue
        words = p.split()
        # several whitespace-separated pictures, or one base64 string wrapped over lines
        if len(words) > 1 and all(_looks_like_image(w) for w in words):
            out += words
        else:
            out.append("".join(words))
    return out


def decode_image(b64: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(_b64decode(b64)))
        img.load()
    except Exception as e:  # binascii, PIL: many types for corrupt data
        raise TouchStoneError(f"cannot decode image: {type(e).__name__}: {e}") from None
    return img.convert("RGB")


@dataclass(frozen=True)
class TouchStoneItem:
    uid: str
    index: str
    images: tuple[str, ...]  # base64 strings, decoded on use
    question: str
    human_annotation: str
    reference: str  # gpt4_ha_answer
    categories: tuple[str, ...]
    task_name: str
    lang: str

    def query(self) -> str:
        pics = [{"image": f"touchstone/{self.index}_{k}.png"} for k in range(1, len(self.images) + 1)]
        return from_list_format([*pics, {"text": self.question}])

    def check_images(self) -> None:
        """Open each picture's header only (no pixel decoding): a row without pictures, bad base64 or a file
        that is not an image fails here, in one line."""
        if not self.images:
            raise TouchStoneError(f"index {self.index} has no picture")
        for k, b in enumerate(self.images, 1):
            try:
                Image.open(io.BytesIO(_b64decode(b)))
            except Exception as e:  # binascii, PIL: many types for corrupt data
                raise TouchStoneError(f"index {self.index}, picture {k}: not an image ({e})") from None

    def pil_images(self) -> list[Image.Image]:
        out = []
        for k, b in enumerate(self.images, 1):
            try:
                out.append(decode_image(b))
            except TouchStoneError as e:
                raise TouchStoneError(f"row index {self.index}, picture {k}: {e}") from None
        return out


def _split_categories(cell: str) -> tuple[str, ...]:
    cats = [c.strip() for c in cell.split(",")]
    return tuple(dict.fromkeys(c for c in cats if c))


def load_touchstone(path: str | os.PathLike) -> list[TouchStoneItem]:
    """All rows of a TouchStone TSV, in file order (images are split into base64 strings, not decoded)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"TouchStone TSV not found: {p}")
    old_limit = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 pictures exceed the 128 KiB default
    try:
        with open(p, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            missing = [c for c in TSV_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise TouchStoneError(f"{p}: not a TouchStone TSV, missing column(s): {', '.join(missing)}")
            rows = list(reader)
    except UnicodeDecodeError as e:
        raise TouchStoneError(f"{p}: not UTF-8 text ({e.reason})") from None
    except csv.Error as e:
        raise TouchStoneError(f"{p}: malformed TSV ({e})") from None
    finally:
        csv.field_size_limit(old_limit)
    items: list[TouchStoneItem] = []
    seen: set[str] = set()
    for n, row in enumerate(rows, 2):
        index = (row["index"] or "").strip()
        if not index:
            raise TouchStoneError(f"{p}: line {n}: empty index")
        if index in seen:
            raise TouchStoneError(f"{p}: duplicate index {index}")
        seen.add(index)
        try:
            images = tuple(split_image_cell(row["image"] or ""))
        except TouchStoneError as e:
            raise TouchStoneError(f"{p}: index {index}: {e}") from None
        question = row["question"] or ""
        digest = hashlib.sha256(f"{question}\t{row['image'] or ''}".encode()).hexdigest()[:12]
        items.append(
            TouchStoneItem(
                uid=f"{index}-{digest}", index=index, images=images, question=question,
                human_annotation=row["human_annotation"] or "", reference=row["gpt4_ha_answer"] or "",
                categories=_split_categories(row["category"] or ""), task_name=(row["task_name"] or "").strip(),
                lang=detect_lang(question),
            )
        )  # fmt: skip
    return items


def stratified_sample(items: Sequence[TouchStoneItem], n: int, seed: int) -> list[TouchStoneItem]:
    """`n` items keeping the proportions of the category strata (an item's stratum is its whole category
    list): largest-remainder quotas, a seeded sample inside each stratum; file order is kept."""
    if n >= len(items):
        return list(items)
    strata: dict[tuple[str, ...], list[int]] = {}
    for i, it in enumerate(items):
        strata.setdefault(tuple(sorted(it.categories)), []).append(i)
    keys = sorted(strata)
    quotas = {k: n * len(strata[k]) / len(items) for k in keys}
    take = {k: int(q) for k, q in quotas.items()}
    order = keys[:]
    random.Random(f"{seed}|ties").shuffle(order)  # seeded tie-break among equal remainders
    order.sort(key=lambda k: -(quotas[k] - take[k]))
    for k in order[: n - sum(take.values())]:
        take[k] += 1
    chosen: list[int] = []
    for k in keys:
        chosen += random.Random(f"{seed}|{'|'.join(k)}").sample(strata[k], take[k])
    return [items[i] for i in sorted(chosen)]


def select_items(
    items: Sequence[TouchStoneItem],
    category: str | None = None,
    task: str | None = None,
    lang: str | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[TouchStoneItem]:
    """Filter by category (comma list: any of them), task name and language, then stratified `limit`."""
    out = list(items)
    if category:
        want = {c.strip().lower() for c in category.split(",") if c.strip()}
        known = {c.lower(): c for it in items for c in it.categories}
        unknown = sorted(want - set(known))
        if unknown:
            raise TouchStoneError(f"unknown category {', '.join(unknown)} (known: {', '.join(sorted(known.values()))})")
        out = [it for it in out if want & {c.lower() for c in it.categories}]
    if task:
        known_tasks = {it.task_name.lower(): it.task_name for it in items}
        if task.strip().lower() not in known_tasks:
            raise TouchStoneError(f"unknown task {task!r} (known: {', '.join(sorted(known_tasks.values()))})")
        out = [it for it in out if it.task_name.lower() == task.strip().lower()]
    if lang:
        if lang not in LANGS:
            raise TouchStoneError(f"--lang must be en or zh, got {lang!r}")
        out = [it for it in out if it.lang == lang]
    if limit is not None:
        if limit < 1:
            raise TouchStoneError(f"--limit must be >= 1, got {limit}")
        out = stratified_sample(out, limit, seed)
    if not out:
        raise TouchStoneError("no TouchStone items match the slice (category/task/lang)")
    return out
