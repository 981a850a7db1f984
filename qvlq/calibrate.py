"""Multimodal calibration data for GPTQ: conversations (with their pictures) -> token ids + pixels.

Every row is rendered exactly as the chat model sees a conversation (ChatML, default system prompt,
token-exact with :func:`qvlq.chat.make_context` followed by the final assistant reply and its
``<|im_end|>``; see :func:`qvlq.chat.render_conversation`), tokenized, truncated to ``max_len``
without ever splitting an image span, and its pictures are loaded and preprocessed to the model's
``image_size`` so the vision tower runs on them during quantization.

Sources (``fmt="auto"`` picks by name; or pass json / jsonl / datasets / parquet / txt):

* ``json``: the Qwen-VL finetune file: a list of ``{"id", "conversations": [{"from", "value"}]}``.
  ``.json`` files that hold JSON lines are read as ``jsonl``.
* ``jsonl``: one such row per line (a line that is not JSON is a ``malformed_row``).
* ``datasets``: a directory written by ``Dataset.save_to_disk`` (a ``DatasetDict`` gives its
  ``train`` split, or its only split).
* ``parquet``: a parquet file (e.g. ``Dataset.to_parquet``), read with pyarrow as datasets would.
* ``txt``: plain text, tokenized as is (no ChatML: the ``raw`` chat format). With a blank line in the
  file every blank-line-separated paragraph is one row (truncated to ``max_len``); otherwise the
  whole file is cut into consecutive ``max_len``-token rows.

Row shapes (json, jsonl, datasets and parquet alike):

* ``conversations``: a list of turns (or a JSON string of one). A turn is ``{"from", "value"}`` or
  ``{"role", "content"}``; roles ``user``/``human`` and ``assistant``/``gpt`` (any case); one optional
  leading ``system`` turn replaces the default system prompt. Turns must alternate user, assistant,
  ..., ending with an assistant turn. Pictures are ``Picture N: <img>PATH</img>`` markup in the text.
* otherwise the columns ``image``, ``question``, ``answer``, ``text`` (all optional, at least one
  present) become one exchange: user = ``Picture k: <img>NAME</img>\\n`` per image, then the question;
  assistant = the answer. ``text`` fills whichever of answer / question is missing (answer first), so
  ``{image, text}`` is captioning and ``{text, answer}`` is question/answer. ``image`` may be a path
  string, raw bytes, a PIL image, a datasets ``Image`` value (``{"bytes", "path"}``), or a list of them.
* ``id`` (optional) names the row; the row number otherwise.

Image paths are relative to the directory holding the data file (the dataset directory itself for
``datasets``); absolute paths and http(s) URLs work too. The ids inside each ``<img>...</img>`` span
keep the path as the data wrote it (the model overwrites all of them with image features); the
pixels travel beside the ids, in span order, so nothing is re-read: call the model with
``images=sample.pixels`` (:meth:`CalibSample.model_inputs`).

Truncation: a row longer than ``max_len`` tokens is cut at ``max_len``; if the cut falls inside an
``<img>...</img>`` span it moves back to just before that span's ``<img>``, so the picture and all
later tokens are dropped (the ``Picture N: `` text before it stays). Only the pictures that survive
are loaded.

Sampling: row order is shuffled with ``random.Random(seed)`` and rows are examined in that order
until ``num_samples`` are usable; the chosen samples are kept in source order. This is a uniform
random sample of the usable rows, without replacement; with fewer usable rows all are used and
``stats.note`` says so. Rows are validated when examined (rows never examined are not opened), and
a bad row is skipped and counted under one of :data:`SKIP_REASONS`; ``strict=True`` turns the first
one into a :class:`CalibrationError`.

Bundle format (version 1): a directory, written atomically (temp dir + rename), holding

* ``calibration.safetensors``, for sample ``i`` (0-based, in the order of ``calibration.json``):
  ``input_ids.{i}``: int64 ``[L]``; ``pixels.{i}``: ``[n_images, 3, S, S]`` (only when the sample has
  pictures), ``pixel_dtype`` float32 by default: bit-identical with preprocessing on the fly, 2.4 MB
  per 448-px picture (308 MB for 128); float16 halves that but rounds the pixels. safetensors
  metadata is ``{"format": "pt"}`` only.
* ``calibration.json`` (UTF-8, sorted keys, indent 2, no timestamps), with keys
  ``format`` ("qvlq-calibration"), ``version`` (1), ``pixel_dtype`` ("float32" | "float16"),
  ``model``: ``{n_queries, image_size, image_start_id, vocab_sha256}`` (checked at load:
  ``vocab_sha256`` is the sha256 of the BPE ranks written as ``qwen.tiktoken`` lines, sorted by rank,
  LF endings, so a CRLF copy of the same vocab matches),
  ``stats``: the :class:`CalibStats` fields, and ``samples``: per sample
  ``{id, index, n_tokens, n_images, images, truncated}`` (``index``: row number in the source,
  ``images``: the picture sources as written in the data).

The same inputs give byte-identical files.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import os
import random
import re
import unicodedata
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from .chat import DEFAULT_SYSTEM, render_conversation
from .image import ImageLoadError, load_image, preprocess
from .io import OutputExistsError, atomic_dir, sha256_file

FORMAT_NAME = "qvlq-calibration"
FORMAT_VERSION = 1
TENSORS_FILE = "calibration.safetensors"
META_FILE = "calibration.json"
FORMATS = ("json", "jsonl", "datasets", "parquet", "txt")
SKIP_REASONS = (
    "malformed_row",  # not an object, no usable columns, turns without from/value strings, bad JSON line
    "empty_conversation",  # no turns, or nothing but whitespace (after --text-only stripping)
    "bad_roles",  # unknown role, or not user/assistant alternating, starting with user, ending with assistant
    "path_too_long",  # an image path of 256+ UTF-8 bytes cannot fit an image span
    "missing_image",  # a local picture that does not exist
    "corrupt_image",  # a picture that exists but cannot be decoded
    "url_failed",  # an http(s) picture that could not be fetched or decoded
)
PIXEL_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}
DATA_COLUMNS = ("image", "question", "answer", "text")

_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
_IMG_RE = re.compile(r"<img>(.*?)</img>", re.DOTALL)
_PICTURE_RE = re.compile(r"(?:Picture \d+: ?)?<img>.*?</img>\n?", re.DOTALL)
_PARAGRAPH_RE = re.compile(r"\n[ \t\r\f\v]*\n")

Progress = Callable[[int, int], None]


class CalibrationError(ValueError):
    """Calibration data or a bundle that cannot be used, with a one-line reason."""


class _BadRow(Exception):
    def __init__(self, reason: str, detail: str, has_images: bool = False) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.has_images = reason, detail, has_images


# --------------------------------------------------------------------------------------------------
# Public data types


@dataclass
class CalibStats:
    source: str  # DATA as given
    format: str
    source_sha256: dict[str, str]  # file (relative to DATA for a directory, else its name) -> sha256
    seed: int
    max_len: int
    num_samples_requested: int
    text_only: bool
    rows_total: int  # rows in the source
    rows_examined: int  # rows looked at before num_samples usable ones were found
    samples: int
    total_tokens: int
    mean_tokens: float
    min_tokens: int
    max_tokens: int
    images: int
    image_tokens: int  # ids from <img> to </img> inclusive (n_queries + 2 per picture)
    image_token_share: float  # image_tokens / total_tokens
    truncated_samples: int
    images_dropped_by_truncation: int
    skipped: dict[str, int]  # reason (SKIP_REASONS) -> rows
    note: str = ""


@dataclass
class CalibSample:
    id: str
    input_ids: torch.Tensor  # int64 [L]
    pixels: torch.Tensor | None = None  # [n_images, 3, S, S], one per <img> span in order; None: no picture
    sources: list[str] = field(default_factory=list)  # picture sources as written in the data
    index: int = -1  # row number in the source
    truncated: bool = False

    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def n_images(self) -> int:
        return 0 if self.pixels is None else int(self.pixels.shape[0])

    def model_inputs(self, device: Any = None, dtype: torch.dtype | None = None) -> dict[str, Any]:
        """``model(**sample.model_inputs())``: input_ids [1, L] and the pixels as ``images``."""
        ids = self.input_ids.unsqueeze(0).to(device)
        pixels = None if self.pixels is None else self.pixels.to(device=device, dtype=dtype or self.pixels.dtype)
        return {"input_ids": ids, "images": pixels}


@dataclass
class CalibrationSet:
    samples: list[CalibSample]
    stats: CalibStats
    n_queries: int
    image_size: int
    image_start_id: int
    vocab_sha256: str

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[CalibSample]:
        return iter(self.samples)

    def __getitem__(self, i: int) -> CalibSample:
        return self.samples[i]


# --------------------------------------------------------------------------------------------------
# Model geometry and tokenizer identity


def model_geometry(config: Any) -> tuple[int, int, int]:
    """(n_queries, image_size, image_start_id) of a QWenConfig or of a mapping with those keys."""
    if isinstance(config, Mapping):
        vis = config.get("visual") or {}
        n_queries = config.get("n_queries", vis.get("n_queries", 256))
        size = config.get("image_size", vis.get("image_size"))
        start = config.get("image_start_id", vis.get("image_start_id", 151857))
    else:
        n_queries, size, start = config.n_queries, config.visual["image_size"], config.image_start_id
    if size is None:
        raise CalibrationError("the model config has no visual image_size")
    return int(n_queries), int(size), int(start)


_VOCAB_SHA: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def vocab_sha256(tokenizer: Any) -> str:
    """sha256 of the tokenizer's BPE ranks written as ``qwen.tiktoken`` lines (sorted by rank)."""
    try:
        return _VOCAB_SHA[tokenizer]
    except (KeyError, TypeError):
        pass
    ranks = sorted(tokenizer.mergeable_ranks.items(), key=lambda kv: kv[1])
    digest = hashlib.sha256(b"".join(b"%s %d\n" % (base64.b64encode(t), r) for t, r in ranks)).hexdigest()
    try:
        _VOCAB_SHA[tokenizer] = digest
    except TypeError:  # not weak-referenceable: recompute next time
        pass
    return digest


def load_model_meta(model_dir: str | os.PathLike) -> tuple[Any, Any]:
    """(tokenizer, config) of a model directory; no weights are read."""
    from .model.loading import read_config, resolve_model_dir
    from .tokenizer import QWenTokenizer

    path = resolve_model_dir(model_dir)
    config = read_config(path)
    try:
        tokenizer = QWenTokenizer.from_pretrained(str(path))
    except Exception as e:  # missing qwen.tiktoken, bad tokenizer_config.json ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CalibrationError(f"{path}: cannot load the tokenizer ({msg})") from None
    return tokenizer, config


def _check_tokenizer(tokenizer: Any, n_queries: int, start_id: int) -> None:
    span = int(getattr(tokenizer, "image_span", 256))
    if span != n_queries:
        raise CalibrationError(
            f"the tokenizer writes {span} ids per image span but the model has n_queries={n_queries}"
        )
    if tokenizer.img_start_id != start_id:
        raise CalibrationError(
            f"the tokenizer's <img> id is {tokenizer.img_start_id}, the model's image_start_id is {start_id}"
        )


# --------------------------------------------------------------------------------------------------
# Token-level helpers


def image_spans(ids: list[int], tokenizer: Any) -> list[tuple[int, int]]:
    """(start, end) positions of every ``<img>`` ... ``</img>`` in ``ids``."""
    start, end = tokenizer.img_start_id, tokenizer.img_end_id
    spans, open_at = [], None
    for i, t in enumerate(ids):
        if t == start:
            open_at = i
        elif t == end and open_at is not None:
            spans.append((open_at, i))
            open_at = None
    return spans


def safe_cut(ids: list[int], spans: list[tuple[int, int]], max_len: int) -> int:
    """Where to cut ``ids`` to at most ``max_len`` tokens without splitting a span: ``max_len``, or the
    ``<img>`` of the span it would fall in."""
    cut = min(len(ids), max_len)
    for a, e in spans:
        if a < cut <= e:
            return a
    return cut


def _span_source(ids: list[int], span: tuple[int, int], pad_id: int) -> str:
    inner = ids[span[0] + 1 : span[1]]
    raw = inner[: inner.index(pad_id)] if pad_id in inner else inner
    return bytes(raw).decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------------------
# Sources


@dataclass
class _Source:
    path: Path
    format: str
    base: Path  # where relative image paths start
    rows: Any  # sized, indexable: dicts (json...), str paragraphs or token lists (txt)
    get: Callable[[int], Any]
    files: list[Path]
    kind: str = "rows"  # rows | text | tokens


def detect_format(path: Path) -> str:
    if path.is_dir():
        if any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return "datasets"
        raise CalibrationError(f"{path} is a directory but not a dataset saved with save_to_disk")
    fmt = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".txt": "txt"}.get(
        path.suffix.lower()
    )
    if fmt is None:
        raise CalibrationError(f"cannot tell the format of {path} from its name; pass --format ({', '.join(FORMATS)})")
    return fmt


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


class _Malformed:
    def __init__(self, detail: str) -> None:
        self.detail = detail


def _jsonl_rows(text: str) -> list[Any]:
    rows: list[Any] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            rows.append(_Malformed(f"line {lineno} is not JSON ({e.msg})"))
    return rows


def _open_source(path: Path, fmt: str, tokenizer: Any, max_len: int, text_only: bool) -> _Source:
    if not path.exists():
        raise CalibrationError(f"{path}: no such file or directory")
    fmt = detect_format(path) if fmt in (None, "", "auto") else fmt
    if fmt not in FORMATS:
        raise CalibrationError(f"unknown format {fmt!r} (choose auto, {', '.join(FORMATS)})")
    if fmt != "datasets" and not path.is_file():
        raise CalibrationError(f"{path} is not a file (format {fmt})")
    base = path.parent

    if fmt in ("json", "jsonl"):
        text = _read_text(path)
        rows: Any
        if fmt == "json":
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as e:
                first = next((ln for ln in text.splitlines() if ln.strip()), "")
                try:
                    is_lines = isinstance(json.loads(first), dict)
                except json.JSONDecodeError:
                    is_lines = False
                if not is_lines:
                    raise CalibrationError(f"{path}: invalid JSON ({e})") from None
                rows, fmt = _jsonl_rows(text), "jsonl"
            if not isinstance(rows, list):
                raise CalibrationError(f"{path}: expected a JSON list of rows, found {type(rows).__name__}")
        else:
            rows = _jsonl_rows(text)
        return _Source(path, fmt, base, rows, rows.__getitem__, [path])

    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise CalibrationError(f"{path}: cannot read parquet ({str(e).splitlines()[0]})") from None
        return _Source(path, fmt, base, table, lambda i: table.slice(i, 1).to_pylist()[0], [path])

    if fmt == "datasets":
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise CalibrationError(f"{path}: cannot load the saved dataset ({str(e).splitlines()[0]})") from None
        if isinstance(ds, datasets.DatasetDict):
            splits = list(ds)
            if "train" in ds:
                ds = ds["train"]
            elif len(splits) == 1:
                ds = ds[splits[0]]
            else:
                raise CalibrationError(f"{path}: a DatasetDict with splits {splits} and no 'train'; pass DIR/SPLIT")
        ds = ds.with_format("arrow")  # raw values: images stay {"bytes", "path"} until we decode them
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return _Source(path, fmt, path, ds, lambda i: ds[i].to_pylist()[0], files)

    # txt
    text = _read_text(path)
    if text_only:
        text = _PICTURE_RE.sub("", text)
    if _PARAGRAPH_RE.search(text.strip()):
        paras = [p.strip() for p in _PARAGRAPH_RE.split(text) if p.strip()]
        return _Source(path, fmt, base, paras, paras.__getitem__, [path], kind="text")
    try:
        ids = tokenizer.encode_text(text)
    except ValueError as e:
        raise CalibrationError(f"{path}: {e}") from None
    chunks = _chunks(ids, tokenizer, max_len)
    return _Source(path, fmt, base, chunks, chunks.__getitem__, [path], kind="tokens")


def _chunks(ids: list[int], tokenizer: Any, max_len: int) -> list[list[int]]:
    """Consecutive pieces of at most max_len tokens, cut only outside image spans (a span longer than
    max_len is dropped)."""
    out: list[list[int]] = []
    pos = 0
    while pos < len(ids):
        rest = ids[pos:]
        spans = image_spans(rest, tokenizer)
        cut = safe_cut(rest, spans, max_len)
        if cut == 0:  # a span right here that cannot fit
            pos += spans[0][1] + 1
            continue
        out.append(rest[:cut])
        pos += cut
    return out


def _source_hashes(src: _Source) -> dict[str, str]:
    if src.path.is_dir():
        return {p.relative_to(src.path).as_posix(): sha256_file(p) for p in src.files}
    return {src.path.name: sha256_file(src.path)}


# --------------------------------------------------------------------------------------------------
# Rows -> conversations


def _image_item(value: Any, k: int, taken: set[str]) -> tuple[str, Any]:
    """(name written in the <img> span, inline object or None for a path)."""
    inline: Any = None
    name = ""
    if isinstance(value, str):
        name = value
    elif isinstance(value, Mapping):  # datasets Image feature: {"bytes", "path"}
        if value.get("bytes"):
            inline = bytes(value["bytes"])
            name = os.path.basename(value.get("path") or "")
        else:
            name = value.get("path") or ""
            if not name:
                raise _BadRow("malformed_row", "image value has neither bytes nor path")
    elif isinstance(value, (bytes, bytearray, memoryview)):
        inline = bytes(value)
    elif isinstance(value, Image.Image):
        inline = value
        name = os.path.basename(getattr(value, "filename", "") or "")
    else:
        raise _BadRow("malformed_row", f"image value of type {type(value).__name__}")
    if inline is not None:
        name = name or f"image{k}"
        if name in taken:
            name = f"{name}#{k}"
    taken.add(name)
    return name, inline


def _from_columns(row: Mapping[str, Any]) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    question, answer, text = row.get("question"), row.get("answer"), row.get("text")
    if text is not None:
        if answer is None:
            answer = text
        elif question is None:
            question = text
    for key, v in (("question", question), ("answer", answer)):
        if v is not None and not isinstance(v, str):
            raise _BadRow("malformed_row", f"{key} is a {type(v).__name__}, not text")
    images = row.get("image")
    values = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
    inline: dict[str, Any] = {}
    taken: set[str] = set()
    pictures = []
    for k, value in enumerate(values, 1):
        name, obj = _image_item(value, k, taken)
        if obj is not None:
            inline[name] = obj
        pictures.append(f"Picture {k}: <img>{name}</img>\n")
    return [("user", "".join(pictures) + (question or "")), ("assistant", answer or "")], inline


def _conversation(row: Any, index: int) -> tuple[str, str, list[tuple[str, str]], dict[str, Any]]:
    """(id, system, turns as (role, text), inline images) of a json/datasets row."""
    if isinstance(row, _Malformed):
        raise _BadRow("malformed_row", row.detail)
    if not isinstance(row, Mapping):
        raise _BadRow("malformed_row", f"row is a {type(row).__name__}, not an object")
    rid = row.get("id")
    rid = str(index) if rid is None else str(rid)
    conv = row.get("conversations")
    inline: dict[str, Any] = {}
    if conv is not None:
        if isinstance(conv, str):
            try:
                conv = json.loads(conv)
            except json.JSONDecodeError:
                raise _BadRow("malformed_row", "conversations is a string but not JSON") from None
        if not isinstance(conv, list):
            raise _BadRow("malformed_row", f"conversations is a {type(conv).__name__}, not a list")
        turns = []
        for m in conv:
            if not isinstance(m, Mapping):
                raise _BadRow("malformed_row", "a turn is not an object")
            role = m.get("from", m.get("role"))
            value = m.get("value", m.get("content"))
            if not isinstance(role, str) or not isinstance(value, str):
                raise _BadRow("malformed_row", "a turn needs 'from' and 'value' strings")
            turns.append((role.strip().lower(), value))
    elif any(row.get(c) is not None for c in DATA_COLUMNS):
        turns, inline = _from_columns(row)
    else:
        raise _BadRow(
            "malformed_row", f"no 'conversations' and none of the columns {', '.join(DATA_COLUMNS)}"
        )
    system = DEFAULT_SYSTEM
    if turns and _ROLES.get(turns[0][0]) == "system":
        system = turns[0][1]
        turns = turns[1:]
    return rid, system, turns, inline


def _pairs(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    if not turns or all(not v.strip() for _, v in turns):
        raise _BadRow("empty_conversation", "no turns with text")
    roles = [_ROLES.get(r, r) for r, _ in turns]
    expected = ["user", "assistant"] * (len(turns) // 2)
    if roles != expected or len(turns) % 2:
        raise _BadRow(
            "bad_roles",
            f"roles {[r for r, _ in turns]} (need user/human and assistant/gpt alternating, ending with assistant)",
        )
    return [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns), 2)]


def _check_paths(texts: list[str], span: int) -> bool:
    found = False
    for t in texts:
        for m in _IMG_RE.finditer(unicodedata.normalize("NFC", t)):
            found = True
            n = len(m.group(1).encode("utf-8"))
            if n >= span:
                raise _BadRow(
                    "path_too_long", f"image path of {n} bytes (at most {span - 1}): {m.group(1)[:40]!r}...", True
                )
    return found


# --------------------------------------------------------------------------------------------------
# Pictures


def _decode_inline(obj: Any, name: str) -> Image.Image:
    if isinstance(obj, Image.Image):
        return load_image(obj)
    try:
        img = Image.open(io.BytesIO(obj))
        img.load()
        return img.convert("RGB")
    except Exception as e:
        raise _BadRow("corrupt_image", f"{name}: {type(e).__name__}: {e}", True) from None


def _load_pixels(source: str, inline: dict[str, Any], base: Path, size: int) -> torch.Tensor:
    if source in inline:
        img = _decode_inline(inline[source], source)
    elif source.startswith(("http://", "https://")):
        try:
            img = load_image(source)
        except ImageLoadError as e:
            raise _BadRow("url_failed", str(e), True) from None
    else:
        p = Path(source).expanduser()
        p = p if p.is_absolute() else base / p
        if not p.is_file():
            raise _BadRow("missing_image", f"image not found: {p}", True)
        try:
            img = load_image(p)
        except ImageLoadError as e:
            raise _BadRow("corrupt_image", str(e), True) from None
    try:
        return preprocess(img, size)
    except Exception as e:
        raise _BadRow("corrupt_image", f"{source}: {type(e).__name__}: {e}", True) from None


# --------------------------------------------------------------------------------------------------
# Building


@dataclass
class _Built:
    sample: CalibSample
    had_images: bool
    dropped: int


def _make_sample(
    src: _Source, index: int, tokenizer: Any, max_len: int, text_only: bool, size: int
) -> _Built:
    raw = src.get(index)
    inline: dict[str, Any] = {}
    rid = str(index)
    if src.kind == "tokens":
        ids = list(raw)
    elif src.kind == "text":
        _check_paths([raw], tokenizer.image_span)
        ids = tokenizer.encode_text(raw)
    else:
        rid, system, turns, inline = _conversation(raw, index)
        if text_only:
            turns = [(r, _PICTURE_RE.sub("", v)) for r, v in turns]
            inline = {}
        pairs = _pairs(turns)
        _check_paths([system] + [t for pair in pairs for t in pair], tokenizer.image_span)
        try:
            _, ids = render_conversation(tokenizer, pairs, system)
        except ValueError as e:
            raise _BadRow("malformed_row", str(e)) from None
    spans = image_spans(ids, tokenizer)
    cut = safe_cut(ids, spans, max_len)
    kept = [s for s in spans if s[1] < cut]
    sources = [_span_source(ids, s, tokenizer.img_pad_id) for s in kept]
    pixels = [_load_pixels(s, inline, src.base, size) for s in sources]
    sample = CalibSample(
        id=rid,
        input_ids=torch.tensor(ids[:cut], dtype=torch.int64),
        pixels=None if not pixels else pixels[0].unsqueeze(0) if len(pixels) == 1 else torch.stack(pixels),
        sources=sources,
        index=index,
        truncated=cut < len(ids),
    )
    return _Built(sample, bool(spans), len(spans) - len(kept))


def build_bundle(
    data: str | os.PathLike,
    tokenizer: Any,
    config: Any,
    num_samples: int = 128,
    max_len: int = 2048,
    seed: int = 0,
    strict: bool = False,
    text_only: bool = False,
    fmt: str = "auto",
    progress: Progress | None = None,
) -> CalibrationSet:
    """Read DATA, pick ``num_samples`` usable rows with ``seed``, render, truncate, load pictures.
    ``progress(done, total)`` is called after each accepted sample."""
    if num_samples < 1:
        raise CalibrationError("num_samples must be at least 1")
    if max_len < 1:
        raise CalibrationError("max_len must be at least 1")
    n_queries, size, start_id = model_geometry(config)
    _check_tokenizer(tokenizer, n_queries, start_id)
    path = Path(data)
    src = _open_source(path, fmt, tokenizer, max_len, text_only)
    n_rows = len(src.rows)
    order = list(range(n_rows))
    random.Random(seed).shuffle(order)
    target = min(num_samples, n_rows)

    built: list[_Built] = []
    skipped: Counter[str] = Counter()
    first_problem: dict[str, str] = {}
    rows_with_images = examined = 0
    for idx in order:
        if len(built) >= num_samples:
            break
        examined += 1
        try:
            b = _make_sample(src, idx, tokenizer, max_len, text_only, size)
        except _BadRow as bad:
            if strict:
                raise CalibrationError(f"{path}: row {idx}: {bad.reason}: {bad.detail}") from None
            skipped[bad.reason] += 1
            first_problem.setdefault(bad.reason, f"row {idx}: {bad.detail}")
            rows_with_images += bad.has_images
            continue
        rows_with_images += b.had_images
        built.append(b)
        if progress is not None:
            progress(len(built), target)

    summary = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items()))
    if not built:
        detail = f" (skipped: {summary}; first: {next(iter(first_problem.values()))})" if skipped else ""
        raise CalibrationError(f"no usable calibration rows in {path}: {n_rows} rows{detail}")
    samples = sorted((b.sample for b in built), key=lambda s: s.index)
    n_images = sum(s.n_images for s in samples)
    if rows_with_images and not n_images and not text_only:
        hint = first_problem.get("missing_image") or first_problem.get("corrupt_image") or first_problem.get(
            "url_failed"
        )
        if hint:
            why = f"e.g. {hint}; relative paths start at {src.base}): fix the paths"
        else:
            why = f"max_len {max_len} cuts them all off): raise max_len"
        raise CalibrationError(
            f"{path}: the data references pictures but none could be used ({why}, or calibrate text only"
        )
    lengths = [s.n_tokens for s in samples]
    total = sum(lengths)
    image_tokens = n_images * (n_queries + 2)
    note = ""
    if len(samples) < num_samples:
        note = f"only {len(samples)} usable rows for {num_samples} requested: using all of them"
    stats = CalibStats(
        source=str(data),
        format=src.format,
        source_sha256=_source_hashes(src),
        seed=seed,
        max_len=max_len,
        num_samples_requested=num_samples,
        text_only=text_only,
        rows_total=n_rows,
        rows_examined=examined,
        samples=len(samples),
        total_tokens=total,
        mean_tokens=round(total / len(samples), 3),
        min_tokens=min(lengths),
        max_tokens=max(lengths),
        images=n_images,
        image_tokens=image_tokens,
        image_token_share=round(image_tokens / total, 6) if total else 0.0,
        truncated_samples=sum(s.truncated for s in samples),
        images_dropped_by_truncation=sum(b.dropped for b in built),
        skipped=dict(sorted(skipped.items())),
        note=note,
    )
    return CalibrationSet(samples, stats, n_queries, size, start_id, vocab_sha256(tokenizer))


# --------------------------------------------------------------------------------------------------
# Bundles


def is_bundle(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / META_FILE).is_file()


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.float16: "float16"}[dtype]


def save_bundle(
    calib: CalibrationSet, out: str | os.PathLike, overwrite: bool = False, pixel_dtype: str = "fp32"
) -> Path:
    """Write the bundle directory atomically (see the module docstring); refuses an existing ``out``
    unless ``overwrite``."""
    if pixel_dtype not in PIXEL_DTYPES:
        raise CalibrationError(f"pixel dtype {pixel_dtype!r}: choose fp32 or fp16")
    if not calib.samples:
        raise CalibrationError("empty calibration set: nothing to save")
    dtype = PIXEL_DTYPES[pixel_dtype]
    tensors: dict[str, torch.Tensor] = {}
    records = []
    for i, s in enumerate(calib.samples):
        tensors[f"input_ids.{i}"] = s.input_ids.to(torch.int64).contiguous()
        if s.pixels is not None:
            tensors[f"pixels.{i}"] = s.pixels.to(dtype).contiguous()
        records.append(
            {"id": s.id, "index": s.index, "n_tokens": s.n_tokens, "n_images": s.n_images,
             "images": list(s.sources), "truncated": s.truncated}
        )  # fmt: skip
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "pixel_dtype": _dtype_name(dtype),
        "model": {
            "n_queries": calib.n_queries,
            "image_size": calib.image_size,
            "image_start_id": calib.image_start_id,
            "vocab_sha256": calib.vocab_sha256,
        },
        "stats": dataclasses.asdict(calib.stats),
        "samples": records,
    }
    text = json.dumps(meta, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    with atomic_dir(out, overwrite) as tmp:
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": "pt"})
        (tmp / META_FILE).write_text(text, encoding="utf-8")
    return Path(out)


def load_bundle(
    path: str | os.PathLike, expect_config: Any = None, expect_tokenizer: Any = None
) -> CalibrationSet:
    """Read a bundle; with ``expect_config`` (and ``expect_tokenizer``) a bundle made for another
    image geometry (or vocabulary) is refused."""
    p = Path(path)
    if not is_bundle(p):
        raise CalibrationError(f"{p} is not a calibration bundle (no {META_FILE})")
    try:
        meta = json.loads((p / META_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CalibrationError(f"{p / META_FILE}: invalid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CalibrationError(f"{p / META_FILE} is not a {FORMAT_NAME} file")
    if meta.get("version") != FORMAT_VERSION:
        raise CalibrationError(f"{p}: bundle version {meta.get('version')}, this qvlq reads {FORMAT_VERSION}")
    try:
        model = meta["model"]
        n_queries, size, start_id = int(model["n_queries"]), int(model["image_size"]), int(model["image_start_id"])
        records, vocab = meta["samples"], str(model["vocab_sha256"])
        names = {f.name for f in dataclasses.fields(CalibStats)}
        stats = CalibStats(**{k: v for k, v in meta["stats"].items() if k in names})
    except (KeyError, TypeError, ValueError) as e:
        raise CalibrationError(f"{p / META_FILE}: incomplete metadata ({type(e).__name__}: {e})") from None
    if expect_config is not None:
        want = model_geometry(expect_config)
        if want != (n_queries, size, start_id):
            raise CalibrationError(
                f"{p} was built for n_queries={n_queries}, image_size={size}, image_start_id={start_id}; "
                f"the model has n_queries={want[0]}, image_size={want[1]}, image_start_id={want[2]}: "
                "rebuild it with qvlq calibrate --model for this model"
            )
    if expect_tokenizer is not None and vocab_sha256(expect_tokenizer) != vocab:
        raise CalibrationError(f"{p} was tokenized with another vocabulary (vocab_sha256 differs)")
    try:
        tensors = load_file(str(p / TENSORS_FILE))
    except Exception as e:
        raise CalibrationError(f"{p / TENSORS_FILE}: unreadable ({str(e).splitlines()[0]})") from None
    start, end = start_id, start_id + 1
    samples = []
    for i, rec in enumerate(records):
        ids = tensors.pop(f"input_ids.{i}", None)
        pixels = tensors.pop(f"pixels.{i}", None)
        if ids is None or ids.dtype != torch.int64 or ids.dim() != 1:
            raise CalibrationError(f"{p}: input_ids.{i} missing or not an int64 vector")
        n_spans = int((ids == start).sum())
        n_pix = 0 if pixels is None else int(pixels.shape[0])
        if n_spans != n_pix or n_spans != int((ids == end).sum()) or n_pix != int(rec.get("n_images", -1)):
            raise CalibrationError(f"{p}: sample {i} has {n_spans} image spans but {n_pix} pictures")
        if pixels is not None and tuple(pixels.shape[1:]) != (3, size, size):
            raise CalibrationError(f"{p}: pixels.{i} has shape {tuple(pixels.shape)}, expected (n, 3, {size}, {size})")
        samples.append(
            CalibSample(
                id=str(rec.get("id", i)), input_ids=ids, pixels=pixels, sources=list(rec.get("images", [])),
                index=int(rec.get("index", -1)), truncated=bool(rec.get("truncated", False)),
            )
        )  # fmt: skip
    if tensors:
        raise CalibrationError(f"{p}: unexpected tensors {sorted(tensors)[:3]} (not listed in {META_FILE})")
    return CalibrationSet(samples, stats, n_queries, size, start_id, vocab)


def load_calibration(
    data_or_bundle: str | os.PathLike, tokenizer: Any, config: Any, **opts: Any
) -> CalibrationSet:
    """A bundle directory (checked against the model's geometry and vocabulary; build options are
    ignored: it is already built) or raw DATA, calibrated on the fly with ``build_bundle(**opts)``."""
    if is_bundle(data_or_bundle):
        return load_bundle(data_or_bundle, expect_config=config, expect_tokenizer=tokenizer)
    return build_bundle(data_or_bundle, tokenizer, config, **opts)


def calibrate(
    data: str | os.PathLike,
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    overwrite: bool = False,
    pixel_dtype: str = "fp32",
    **opts: Any,
) -> CalibrationSet:
    """What ``qvlq calibrate`` does: tokenizer + config from ``model_dir``, build, save to ``out``."""
    if Path(out).exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists (pass --overwrite to replace it)")
    if pixel_dtype not in PIXEL_DTYPES:
        raise CalibrationError(f"pixel dtype {pixel_dtype!r}: choose fp32 or fp16")
    if not Path(data).exists():
        raise CalibrationError(f"{data}: no such file or directory")
    tokenizer, config = load_model_meta(model_dir)
    calib = build_bundle(data, tokenizer, config, **opts)
    save_bundle(calib, out, overwrite=overwrite, pixel_dtype=pixel_dtype)
    return calib


__all__ = [
    "CalibSample",
    "CalibStats",
    "CalibrationError",
    "CalibrationSet",
    "SKIP_REASONS",
    "build_bundle",
    "calibrate",
    "detect_format",
    "image_spans",
    "is_bundle",
    "load_bundle",
    "load_calibration",
    "load_model_meta",
    "model_geometry",
    "safe_cut",
    "save_bundle",
    "vocab_sha256",
]
