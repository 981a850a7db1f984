"""Synthetic multimodal task suite for qvlq-mini: scenes, questions, writers and scoring.

Every scene is a plain light image holding 1-3 non-overlapping shapes of distinct colours and,
optionally, one dark word. Six tasks ask about it with exact short answers (colour, shape, count,
existence, OCR, grounding), so a small Qwen-VL trained on them gives accuracy numbers that move
measurably when the model is quantized.

Generation is deterministic: sample ``i`` of ``(seed, split)`` is drawn from its own RNG, seeded
from those three values only, so it does not depend on ``n``, on other samples or on the machine
(the text uses Pillow's embedded Aileron font). Grounding boxes follow Qwen-VL: integers in
[0, 1000) relative to the image size, ``int(x / width * 1000)``.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import random
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from PIL import Image, ImageDraw, ImageFont, features

from qvlq.grounding import Box, GroundedBox, iou, parse_boxes  # noqa: F401 (scoring API re-exports them)
from qvlq.stats import bootstrap_ci
from qvlq.touchstone import TSV_COLUMNS

RGB = tuple[int, int, int]


class Task(str, Enum):
    COLOUR = "colour"
    SHAPE = "shape"
    COUNT = "count"
    EXIST = "exist"
    OCR = "ocr"
    GROUND = "ground"

    def __str__(self) -> str:
        return self.value


SPLITS = ("train", "calib", "eval")

# Six hues far apart (red/orange/yellow ~25-50 degrees apart, the rest much further) and saturated,
# so they stay separable after bicubic downscaling and CLIP normalisation.
PALETTE: dict[str, RGB] = {
    "red": (220, 30, 30),
    "orange": (245, 130, 0),
    "yellow": (235, 200, 0),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "purple": (140, 50, 190),
}
# Silhouettes that differ at ~25 px (a shape's size once a 224 image is squashed to 112): a star's
# points blur into a blob at that size, while a plus-shaped cross keeps its notches.
SHAPE_KINDS: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# A closed vocabulary of short words: a tiny model can learn to read them, random letter strings it
# cannot. No colour or shape names, so OCR answers never collide with the other tasks' answers.
WORDS: tuple[str, ...] = (
    "CAT", "DOG", "SUN", "BOX", "CUP", "HAT", "KEY", "MAP", "PEN", "BUS", "FOX", "OWL",
    "TREE", "FISH", "BIRD", "LAMP", "DOOR", "BOAT", "MOON", "FROG", "CAKE", "KITE", "BELL", "LION",
)  # fmt: skip
BACKGROUND: RGB = (250, 250, 250)
TEXT_COLOUR: RGB = (20, 20, 20)

# Few fixed phrasings per task. Fields: color, kind, obj ("red circle"), a_obj ("a red circle").
TEMPLATES: dict[Task, tuple[str, ...]] = {
    Task.COLOUR: ("What color is the {kind}?", "What is the color of the {kind}?"),
    Task.SHAPE: ("What shape is the {color} object?", "Which shape is {color}?"),
    Task.COUNT: ("How many shapes are there?", "How many shapes are in the image?"),
    Task.EXIST: ("Is there {a_obj}?", "Is there {a_obj} in the image?"),
    Task.OCR: ("What does the text say?", "Read the text in the image."),
    Task.GROUND: ("Where is the {obj}?", "Give the bounding box of the {obj}."),
}

# TouchStone categories may be comma-separated lists (qvlq.touchstone reads them back).
TOUCHSTONE_CATEGORY: dict[Task, str] = {
    Task.COLOUR: "recognition",
    Task.SHAPE: "recognition",
    Task.COUNT: "recognition,comprehension",
    Task.EXIST: "recognition",
    Task.OCR: "recognition",
    Task.GROUND: "recognition,comprehension",
}
TOUCHSTONE_TASK_NAME: dict[Task, str] = {
    Task.COLOUR: "color recognition",
    Task.SHAPE: "shape recognition",
    Task.COUNT: "object counting",
    Task.EXIST: "object existence",
    Task.OCR: "text recognition",
    Task.GROUND: "visual grounding",
}

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_HAS_FREETYPE = features.check("freetype2")


# ---------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class SceneConfig:
    """How scenes are drawn. Sizes are fractions of the shorter image side, so they scale."""

    width: int = 224
    height: int = 224
    min_shapes: int = 1
    max_shapes: int = 3
    shape_frac: tuple[float, float] = (0.2, 0.3)  # side of a shape's square bbox
    text_prob: float = 0.5  # chance of a word in scenes whose task does not need one
    font_frac: float = 0.16  # font size (px per em)
    gap_frac: float = 0.04  # minimum gap between objects and to the border
    colors: tuple[str, ...] = tuple(PALETTE)
    kinds: tuple[str, ...] = SHAPE_KINDS
    words: tuple[str, ...] = WORDS

    def __post_init__(self) -> None:
        if not 1 <= self.min_shapes <= self.max_shapes:
            raise ValueError("need 1 <= min_shapes <= max_shapes")
        if unknown := set(self.colors) - set(PALETTE):
            raise ValueError(f"colours not in PALETTE: {sorted(unknown)}")
        if unknown := set(self.kinds) - set(SHAPE_KINDS):
            raise ValueError(f"shape kinds not supported: {sorted(unknown)}")
        if len(set(self.colors)) < self.max_shapes:
            raise ValueError("need at least max_shapes distinct colours (colours identify shapes)")
        if not self.words or not self.kinds:
            raise ValueError("words and kinds must not be empty")

    @property
    def side(self) -> int:
        return min(self.width, self.height)


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    bbox: Box  # pixels, inclusive corners (as passed to ImageDraw)

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"


@dataclass(frozen=True)
class TextItem:
    text: str
    bbox: Box  # tight ink box, pixels, inclusive corners
    font_size: int


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    shapes: tuple[Shape, ...]
    text: TextItem | None = None

    def render(self) -> Image.Image:
        img = Image.new("RGB", (self.width, self.height), BACKGROUND)
        draw = ImageDraw.Draw(img)
        for shape in self.shapes:
            _draw_shape(draw, shape)
        if self.text is not None:
            mask = _text_mask(self.text.text, self.text.font_size)
            x1, y1 = self.text.bbox[:2]
            img.paste(TEXT_COLOUR, (x1, y1, x1 + mask.width, y1 + mask.height), mask)
        return img

    def qwen_box(self, bbox: Box) -> Box:
        return to_qwen_box(bbox, self.width, self.height)

    def describe(self) -> str:
        """Fine-grained description (TouchStone's human_annotation) built from the metadata."""
        n = len(self.shapes)
        parts = [
            f"{_with_article(s.name)} {position_phrase(s.bbox, self.width, self.height)} "
            f"(box {_box_text(self.qwen_box(s.bbox))})"
            for s in self.shapes
        ]
        out = (
            f"A {self.width}x{self.height} image with a plain white background and "
            f"{_NUMBER_WORDS[n]} shape{'s' if n > 1 else ''}: {_join(parts)}."
        )
        if self.text is None:
            out += " There is no text in the image."
        else:
            where = position_phrase(self.text.bbox, self.width, self.height)
            out += (
                f" The word '{self.text.text}' is written in large black capital letters {where} "
                f"(box {_box_text(self.qwen_box(self.text.bbox))})."
            )
        return out + " Boxes are (x1,y1),(x2,y2) with coordinates scaled to 0-1000."


def to_qwen_box(bbox: Sequence[float], width: int, height: int) -> Box:
    """Pixel box -> Qwen-VL integer box in [0, 1000)."""
    x1, y1, x2, y2 = bbox

    def scale(v: float, size: int) -> int:
        return min(999, max(0, int(v / size * 1000)))

    return (scale(x1, width), scale(y1, height), scale(x2, width), scale(y2, height))


def from_qwen_box(box: Sequence[float], width: int, height: int) -> Box:
    """Qwen-VL box -> pixel box (the official drawing convention, int(x / 1000 * w))."""
    x1, y1, x2, y2 = box
    return (int(x1 / 1000 * width), int(y1 / 1000 * height), int(x2 / 1000 * width), int(y2 / 1000 * height))


def format_box(ref: str | None, box: Sequence[int]) -> str:
    """``<ref>ref</ref><box>(x1,y1),(x2,y2)</box>`` (the ref part omitted when ``ref`` is None)."""
    head = "" if ref is None else f"<ref>{ref}</ref>"
    return f"{head}<box>{_box_text(box)}</box>"


def position_phrase(bbox: Sequence[float], width: int, height: int) -> str:
    """Where a box's centre lies on a 3x3 grid, e.g. 'in the upper left'."""
    col = min(2, int(3 * (bbox[0] + bbox[2]) / 2 / width))
    row = min(2, int(3 * (bbox[1] + bbox[3]) / 2 / height))
    return _POSITIONS[row][col]


_POSITIONS = (
    ("in the upper left", "at the top", "in the upper right"),
    ("on the left", "in the center", "on the right"),
    ("in the lower left", "at the bottom", "in the lower right"),
)


def _box_text(box: Sequence[int]) -> str:
    x1, y1, x2, y2 = box
    return f"({x1},{y1}),({x2},{y2})"


def _with_article(phrase: str) -> str:
    return f"{'an' if phrase[:1] in 'aeiou' else 'a'} {phrase}"


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    x1, y1, x2, y2 = shape.bbox
    fill = PALETTE[shape.color]
    if shape.kind == "circle":
        draw.ellipse(shape.bbox, fill=fill)
    elif shape.kind == "square":
        draw.rectangle(shape.bbox, fill=fill)
    elif shape.kind == "triangle":
        draw.polygon([(x1, y2), (x2, y2), ((x1 + x2) // 2, y1)], fill=fill)
    elif shape.kind == "cross":
        arm = (x2 - x1 + 1) // 3  # the bar is the middle third
        draw.rectangle((x1, y1 + arm, x2, y2 - arm), fill=fill)
        draw.rectangle((x1 + arm, y1, x2 - arm, y2), fill=fill)
    else:
        raise ValueError(f"unknown shape kind {shape.kind!r}")


@lru_cache(maxsize=4096)
def _text_mask(text: str, size: int) -> Image.Image:
    """Tightly cropped 'L' coverage mask of ``text`` (cached: the vocabulary is small)."""
    if _HAS_FREETYPE:
        font = ImageFont.load_default(size)  # Pillow's embedded Aileron: identical everywhere
        left, top, right, bottom = font.getbbox(text)
        mask = Image.new("L", (right - left, bottom - top), 0)
        ImageDraw.Draw(mask).text((-left, -top), text, fill=255, font=font)
    else:
        # Pillow without FreeType: upscale the built-in ~11 px bitmap font instead.
        font = ImageFont.load_default()
        left, top, right, bottom = font.getbbox(text)
        small = Image.new("L", (right - left, bottom - top), 0)
        ImageDraw.Draw(small).text((-left, -top), text, fill=255, font=font)
        scale = max(1, round(size / 11))
        mask = small.resize((small.width * scale, small.height * scale), Image.Resampling.NEAREST)
    ink = mask.getbbox()
    return mask.crop(ink) if ink else mask


# ---------------------------------------------------------------------------------------------
# Samples


@dataclass
class Sample:
    id: str
    task: Task
    image: Image.Image | str | None  # rendered image, a path, or None (render lazily from scene)
    question: str
    answer: str
    scene: Scene
    target: int | None = None  # index in scene.shapes of the shape asked about (None: none/absent)
    query: str | None = None  # the object phrase asked about, e.g. "blue square" (exist, ground)

    def load_image(self) -> Image.Image:
        if isinstance(self.image, Image.Image):
            return self.image
        if self.image is None:
            return self.scene.render()
        with Image.open(self.image) as img:
            return img.convert("RGB")


TaskMix = Mapping[Task | str, float] | Sequence[Task | str] | None


def generate_sample(
    index: int,
    seed: int = 0,
    split: str = "train",
    *,
    config: SceneConfig | None = None,
    mix: TaskMix = None,
    render: bool = True,
) -> Sample:
    """Sample ``index`` of the suite ``(seed, split)``; handy for lazily indexed datasets."""
    tasks, weights = _normalize_mix(mix)
    return _make_sample(index, seed, _check_split(split), config or SceneConfig(), tasks, weights, render)


def generate_suite(
    n: int,
    seed: int = 0,
    split: str = "train",
    *,
    config: SceneConfig | None = None,
    mix: TaskMix = None,
    render: bool = True,
) -> list[Sample]:
    """``n`` samples of split ``split`` (train / calib / eval).

    ``mix`` weights the tasks (a mapping task -> weight, or a list of tasks for a uniform mix over
    them); the default is uniform over all six. ``render=False`` leaves ``Sample.image`` None and
    saves ~150 KB per 224x224 sample; ``Sample.load_image()`` renders it on demand, identically.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    return list(iter_suite(n, seed, split, config=config, mix=mix, render=render))


def iter_suite(
    n: int,
    seed: int = 0,
    split: str = "train",
    *,
    config: SceneConfig | None = None,
    mix: TaskMix = None,
    render: bool = True,
) -> Iterator[Sample]:
    """Streaming version of :func:`generate_suite` (same samples, constant memory)."""
    cfg = config or SceneConfig()
    tasks, weights = _normalize_mix(mix)
    split = _check_split(split)
    for i in range(n):
        yield _make_sample(i, seed, split, cfg, tasks, weights, render)


def _check_split(split: str) -> str:
    # Reject typos like "val": they would silently give a fresh, unrelated distribution of seeds.
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def _normalize_mix(mix: TaskMix) -> tuple[tuple[Task, ...], tuple[float, ...]]:
    if mix is None:
        return tuple(Task), (1.0,) * len(Task)
    if isinstance(mix, str):  # a single task name (Task is a str too)
        mix = [mix]
    items = mix.items() if isinstance(mix, Mapping) else [(t, 1.0) for t in mix]
    pairs = [(Task(t), float(w)) for t, w in items]
    if any(w < 0 for _, w in pairs) or not any(w > 0 for _, w in pairs):
        raise ValueError("task mix weights must be >= 0 with at least one > 0")
    pairs = [(t, w) for t, w in pairs if w > 0]
    return tuple(t for t, _ in pairs), tuple(w for _, w in pairs)


def _make_sample(
    index: int,
    seed: int,
    split: str,
    cfg: SceneConfig,
    tasks: tuple[Task, ...],
    weights: tuple[float, ...],
    render: bool,
) -> Sample:
    # String seeds go through SHA-512 in CPython, so this is stable across runs and versions, and
    # the split name keeps the same (seed, index) in two splits on unrelated streams.
    rng = random.Random(f"qvlq-mini:{split}:{seed}:{index}")
    task = rng.choices(tasks, weights)[0]

    n_shapes = rng.randint(cfg.min_shapes, cfg.max_shapes)
    colors = rng.sample(cfg.colors, n_shapes)
    kinds = [rng.choice(cfg.kinds) for _ in range(n_shapes)]
    if task is Task.COLOUR:
        # "the circle" must be unambiguous: the first shape's kind appears once.
        others = [k for k in cfg.kinds if k != kinds[0]]
        if not others:
            colors, kinds = colors[:1], kinds[:1]
        else:
            kinds[1:] = [rng.choice(others) for _ in kinds[1:]]
    word = rng.choice(cfg.words) if task is Task.OCR or rng.random() < cfg.text_prob else None

    scene, first = _layout_scene(rng, cfg, colors, kinds, word)
    target = first if task is Task.COLOUR else rng.randrange(len(scene.shapes))
    shape = scene.shapes[target]
    query: str | None = shape.name

    if task is Task.COLOUR:
        answer = shape.color
    elif task is Task.SHAPE:
        answer = shape.kind
    elif task is Task.COUNT:
        answer, target, query = str(len(scene.shapes)), None, None
    elif task is Task.EXIST:
        if rng.random() < 0.5:
            answer = "yes"
        else:
            answer, target = "no", None
            query = _absent_object(rng, cfg, scene)
    elif task is Task.OCR:
        assert scene.text is not None
        answer, target, query = scene.text.text, None, None
    else:  # GROUND
        answer = format_box(f"the {shape.name}", scene.qwen_box(shape.bbox))

    obj = query or shape.name
    color, kind = obj.split(" ", 1)
    question = rng.choice(TEMPLATES[task]).format(color=color, kind=kind, obj=obj, a_obj=_with_article(obj))
    return Sample(
        id=f"{split}-{seed}-{index:06d}",
        task=task,
        image=scene.render() if render else None,
        question=question,
        answer=answer,
        scene=scene,
        target=target,
        query=query,
    )


def _absent_object(rng: random.Random, cfg: SceneConfig, scene: Scene) -> str:
    present = {(s.color, s.kind) for s in scene.shapes}
    absent = [(c, k) for c in cfg.colors for k in cfg.kinds if (c, k) not in present]
    # Half the negatives share a colour or a kind with a shape in the scene, so the model must bind
    # colour to shape instead of checking either one alone.
    colors, kinds = {c for c, _ in present}, {k for _, k in present}
    hard = [(c, k) for c, k in absent if c in colors or k in kinds]
    c, k = rng.choice(hard if hard and rng.random() < 0.5 else absent)
    return f"{c} {k}"


def _layout_scene(
    rng: random.Random, cfg: SceneConfig, colors: list[str], kinds: list[str], word: str | None
) -> tuple[Scene, int]:
    """Place shapes (and the word) without overlap; returns the scene and where shape 0 ended up."""
    side = cfg.side
    gap = max(2, round(cfg.gap_frac * side))
    lo, hi = (max(4, round(f * side)) for f in cfg.shape_frac)
    sizes = [rng.randint(lo, hi) for _ in colors]
    font_size = max(6, round(cfg.font_frac * side))
    mask = _text_mask(word, font_size) if word else None

    for _ in range(100):
        taken: list[Box] = []
        text_box = None
        if mask is not None:  # the word is the widest object: place it first
            text_box = _free_box(rng, cfg, mask.width, mask.height, gap, taken)
            if text_box is None:
                continue
            taken.append(text_box)
        for size in sizes:
            box = _free_box(rng, cfg, size, size, gap, taken)
            if box is None:
                break
            taken.append(box)
        else:
            shape_boxes = taken[1:] if mask is not None else taken
            shapes = [Shape(k, c, b) for k, c, b in zip(kinds, colors, shape_boxes, strict=True)]
            ordered = sorted(shapes, key=lambda s: (s.bbox[1], s.bbox[0]))  # reading order
            text = TextItem(word, text_box, font_size) if word and text_box else None
            return Scene(cfg.width, cfg.height, tuple(ordered), text), ordered.index(shapes[0])
    raise RuntimeError("could not place the objects without overlap; use smaller shapes or fonts")


def _free_box(rng: random.Random, cfg: SceneConfig, w: int, h: int, gap: int, taken: list[Box]) -> Box | None:
    if w + 2 * gap > cfg.width or h + 2 * gap > cfg.height:
        raise ValueError(f"an object of {w}x{h} px does not fit a {cfg.width}x{cfg.height} image")
    for _ in range(30):
        x1 = rng.randint(gap, cfg.width - gap - w)
        y1 = rng.randint(gap, cfg.height - gap - h)
        box = (x1, y1, x1 + w - 1, y1 + h - 1)
        if not any(_too_close(box, other, gap) for other in taken):
            return box
    return None


def _too_close(a: Box, b: Box, gap: int) -> bool:
    return not (a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1])


# ---------------------------------------------------------------------------------------------
# Writers


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_finetune_json(samples: Iterable[Sample], out_dir: str | Path, name: str = "train") -> Path:
    """Write ``out_dir/{name}.json`` in the Qwen-VL finetune format plus ``out_dir/images/{id}.png``.

    Image paths in the conversations are relative to the JSON file. Returns the JSON path.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    seen: set[str] = set()
    for sample in samples:
        if not re.fullmatch(r"[\w.-]+", sample.id) or sample.id in seen:
            raise ValueError(f"sample id {sample.id!r} is not a unique, file-name-safe string")
        seen.add(sample.id)
        rel = f"images/{sample.id}.png"
        _atomic_write(out / rel, png_bytes(sample.load_image()))
        records.append(
            {
                "id": sample.id,
                "conversations": [
                    {"from": "user", "value": f"Picture 1: <img>{rel}</img>\n{sample.question}"},
                    {"from": "assistant", "value": sample.answer},
                ],
            }
        )
    path = out / f"{name}.json"
    _atomic_write(path, json.dumps(records, ensure_ascii=False, indent=1).encode("utf-8"))
    return path


def reference_answer(sample: Sample) -> str:
    """A full-sentence reference answer (TouchStone's gpt4_ha_answer); scores True against the answer."""
    task, scene = sample.task, sample.scene
    shape = scene.shapes[sample.target] if sample.target is not None else None
    if task is Task.COLOUR and shape is not None:
        return f"The {shape.kind} is {shape.color}."
    if task is Task.SHAPE and shape is not None:
        return f"The {shape.color} object is {_with_article(shape.kind)}."
    if task is Task.COUNT:
        n = len(scene.shapes)
        return f"There {'is' if n == 1 else 'are'} {n} shape{'' if n == 1 else 's'} in the image."
    if task is Task.EXIST:
        obj = _with_article(sample.query or "")
        if sample.answer == "yes":
            return f"Yes, there is {obj} in the image."
        return f"No, there is no {sample.query} in the image."
    if task is Task.OCR:
        return f'The text says "{sample.answer}".'
    if task is Task.GROUND and shape is not None:
        where = position_phrase(shape.bbox, scene.width, scene.height)
        return f"The {shape.name} is {where} of the image: {sample.answer}"
    raise ValueError(f"sample {sample.id} has no target for task {task}")


def touchstone_row(sample: Sample, index: int) -> dict[str, str]:
    return {
        "index": str(index),
        "image": base64.b64encode(png_bytes(sample.load_image())).decode("ascii"),
        "question": sample.question,
        "human_annotation": sample.scene.describe(),
        "gpt4_ha_answer": reference_answer(sample),
        "category": TOUCHSTONE_CATEGORY[sample.task],
        "task_name": TOUCHSTONE_TASK_NAME[sample.task],
    }


def write_touchstone_tsv(samples: Iterable[Sample], path: str | Path) -> Path:
    """Write a TouchStone-shaped TSV (header + one row per sample, index from 0), atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=TSV_COLUMNS, delimiter="\t", lineterminator="\n")
    writer.writeheader()
    for i, sample in enumerate(samples):
        writer.writerow(touchstone_row(sample, i))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, buf.getvalue().encode("utf-8"))
    return path


def _atomic_write(path: Path, data: bytes) -> None:
    # Write next to the target and rename, so readers never see a half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# Scoring


def normalize_answer(text: str) -> str:
    """Lower-case, punctuation to spaces, whitespace collapsed."""
    return " ".join(re.sub(r"[^\w\s]|_", " ", text.lower()).split())


def _words(text: str) -> list[str]:
    return [w for w in normalize_answer(text).split() if w not in ("a", "an", "the")]


def _number(word: str) -> int | None:
    if word.isdigit():
        return int(word)
    return _NUMBER_WORDS.index(word) if word in _NUMBER_WORDS else None


def _closed_vocab_match(pred: list[str], ref: list[str], vocab: set[str]) -> bool:
    # The reference occurs and no other answer from the task's vocabulary does: accepts
    # "The circle is red." for "red" but not "red or blue".
    k = len(ref)
    found = any(pred[i : i + k] == ref for i in range(len(pred) - k + 1))
    return found and not any(w in vocab and w not in ref for w in pred)


def score_answer(
    task: Task | str, prediction: str, reference: str, *, strict: bool = False, iou_threshold: float = 0.5
) -> bool:
    """Whether ``prediction`` answers correctly given the suite's ``reference`` answer.

    Text tasks compare after normalising case, punctuation, whitespace and articles; counts accept
    digits or number words. Unless ``strict``, a sentence also counts when it names the reference
    and no competing answer (for yes/no, its first word decides). Grounding takes the first box of
    the prediction (``<ref>`` optional) and needs IoU >= ``iou_threshold`` with the reference box.
    """
    task = Task(task)
    if task is Task.GROUND:
        ref_boxes = parse_boxes(reference)
        if not ref_boxes:
            raise ValueError(f"reference has no <box>: {reference!r}")
        pred_boxes = parse_boxes(prediction)
        return bool(pred_boxes) and iou(pred_boxes[0].box, ref_boxes[0].box) >= iou_threshold

    ref = _words(reference)
    if not ref:
        raise ValueError("empty reference answer")
    pred = _words(prediction)
    if task is Task.COUNT:
        want = _number(ref[0]) if len(ref) == 1 else None
        if want is None:
            raise ValueError(f"count reference is not a number: {reference!r}")
        if strict:
            return len(pred) == 1 and _number(pred[0]) == want
        return {n for n in map(_number, pred) if n is not None} == {want}
    if pred == ref:
        return True
    if strict:
        return False
    if task is Task.EXIST:
        if pred and pred[0] in ("yes", "no"):
            return pred[0] == ref[0]
        return _closed_vocab_match(pred, ref, {"yes", "no"})
    vocab = {
        Task.COLOUR: set(PALETTE),
        Task.SHAPE: set(SHAPE_KINDS),
        Task.OCR: {w.lower() for w in WORDS},
    }[task]
    return _closed_vocab_match(pred, ref, vocab)


class TaskScore(NamedTuple):
    accuracy: float
    ci_low: float
    ci_high: float
    n: int


def summarize(
    results: Iterable[tuple[Task | str, bool]], *, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> dict[str, TaskScore]:
    """Accuracy per task (keys: task values, in Task order) plus ``"all"``, each with a seeded
    percentile-bootstrap (1 - alpha) interval."""
    by_task: dict[Task, list[float]] = {}
    for task, correct in results:
        by_task.setdefault(Task(task), []).append(1.0 if correct else 0.0)
    groups = {t.value: by_task[t] for t in Task if t in by_task}
    groups["all"] = [v for t in Task for v in by_task.get(t, [])]
    out: dict[str, TaskScore] = {}
    for key, values in groups.items():
        if not values:
            continue
        low, high = bootstrap_ci(values, n=n_boot, seed=seed, alpha=alpha)
        out[key] = TaskScore(sum(values) / len(values), low, high, len(values))
    return out
