"""Qwen-VL tokenizer: the `qwen.tiktoken` byte-level BPE plus Qwen-VL's special tokens, as an HF tokenizer.

Token ids (N = number of BPE ranks in the vocab file; 151,643 for the real one):

* ``0 .. N-1``: BPE ranks. Text is NFC-normalised, pre-split with Qwen's regex and merged by tiktoken.
* ``N``: ``<|endoftext|>`` (eos and pad), ``N+1``/``N+2``: ``<|im_start|>``/``<|im_end|>``,
  ``N+3 .. N+207``: ``<|extra_0|> .. <|extra_204|>``, then ``<ref> </ref> <box> </box> <quad> </quad>
  <img> </img> <imgpad>`` (ids ``N+208 .. N+216``); ``len(tokenizer) == N + 217`` (151,860).

Images: ``<img>PATH</img>`` in text becomes ``<img>``, one id per UTF-8 byte of PATH whose id *is* the
byte value (0..255, not its BPE rank), ``<imgpad>`` up to 256 ids, ``</img>``: 258 ids, whose 256 inner
positions the model overwrites with the image features. Decoding turns such a span back into
``<img>PATH</img>``.

Special-token policy (differs from the official tokenizer on purpose):

* ChatML/eos/extra token strings typed in text (``"<|im_end|>"``) are encoded as *ordinary text* by
  default, so user content cannot forge turn boundaries. Pass ``allowed_special="all"`` (constructor
  or per call) to get the official behaviour, where such strings become special tokens; or a set of
  token strings to allow only those.
* The grounding markup ``<ref> </ref> <box> </box> <quad> </quad>`` is structural in Qwen-VL (the demo
  and the fine-tuning data write it as text), so it is always recognised.
* ``<img>``/``</img>``/``<imgpad>`` are only ever produced from a complete ``<img>...</img>`` span; an
  unmatched tag, or a typed ``<imgpad>``, stays plain text even with ``allowed_special="all"`` (a lone
  image tag would break the model's image-span bookkeeping).

Chat code should frame turns with the special ids (``im_start_id`` ...) and encode content with
:meth:`QWenTokenizer.encode_text`. Nothing is ever imported from a model directory: ``auto_map`` in
``tokenizer_config.json`` is kept for the old remote-code stack but never followed by qvlq.
"""

from __future__ import annotations

import base64
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tiktoken
from transformers import AddedToken, PreTrainedTokenizer

VOCAB_FILE = "qwen.tiktoken"
PAT_STR = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501 (the exact official regex)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))
REF_START, REF_END = "<ref>", "</ref>"
BOX_START, BOX_END = "<box>", "</box>"
QUAD_START, QUAD_END = "<quad>", "</quad>"
IMG_START, IMG_END, IMG_PAD = "<img>", "</img>", "<imgpad>"

# Order defines the ids: SPECIAL_TOKENS[k] has id N + k.
SPECIAL_TOKENS: tuple[str, ...] = (
    ENDOFTEXT, IM_START, IM_END, *EXTRAS,
    REF_START, REF_END, BOX_START, BOX_END, QUAD_START, QUAD_END, IMG_START, IMG_END, IMG_PAD,
)  # fmt: skip
NUM_SPECIAL = len(SPECIAL_TOKENS)  # 217
MARKUP_TAGS = frozenset({REF_START, REF_END, BOX_START, BOX_END, QUAD_START, QUAD_END})
IMAGE_TAGS = frozenset({IMG_START, IMG_END, IMG_PAD})
IMAGE_SPAN = 256  # ids strictly between <img> and </img>: path bytes + pads (= the resampler's queries)

DEFAULT_MODEL_MAX_LENGTH = 8192
OFFICIAL_AUTO_MAP = {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}

AllowedSpecial = str | Iterable[str] | None

_IMAGE_SPAN_RE = re.compile(re.escape(IMG_START) + "(.*?)" + re.escape(IMG_END), re.DOTALL)


# --------------------------------------------------------------------------------------------------
# Vocabulary file I/O


def load_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken BPE file: one ``base64(token_bytes) rank`` per line (LF or CRLF)."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                tok, rank = line.split()
                ranks[base64.b64decode(tok, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: not a 'base64 rank' line: {line[:80]!r}") from e
    return ranks


def write_tiktoken_ranks(path: str | os.PathLike, ranks: Mapping[bytes, int]) -> None:
    """Write ``ranks`` in the tiktoken format (sorted by rank, LF line endings)."""
    lines = [
        base64.b64encode(tok).decode("ascii") + " " + str(rank)
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])
    ]
    Path(path).write_text("\n".join(lines) + "\n", encoding="ascii", newline="\n")


def _check_ranks(ranks: Mapping[bytes, int]) -> None:
    # Special ids are placed at N = len(ranks), so the ranks must be exactly 0..N-1; every single byte
    # must be a token or tiktoken cannot encode arbitrary text.
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("BPE ranks must be exactly 0..N-1 with no gaps or duplicates")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"BPE vocab lacks {len(missing)} single-byte tokens (e.g. byte {missing[0]})")


# --------------------------------------------------------------------------------------------------
# List format (the official demo's way of mixing images, text and boxes)

_LIST_RE = re.compile(
    r"(?:Picture \d+: ?)?<img>(?P<image>.*?)</img>\n?"
    r"|<ref>(?P<ref>.*?)</ref>"
    r"|<box>\(\s*(?P<x1>-?\d+)\s*,\s*(?P<y1>-?\d+)\s*\)\s*,\s*\(\s*(?P<x2>-?\d+)\s*,\s*(?P<y2>-?\d+)\s*\)</box>",
    re.DOTALL,
)


def _is_single_box(box: Any) -> bool:
    return isinstance(box, Sequence) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)


def from_list_format(items: Iterable[Mapping[str, Any]]) -> str:
    """Build a query string: ``{'image': p}`` -> ``"Picture n: <img>p</img>\\n"`` (n counts images
    from 1), ``{'text': t}`` -> ``t``, ``{'box': (x1, y1, x2, y2), 'ref': r}`` -> ``"<ref>r</ref>"`` (if
    ``ref``) then ``"<box>(x1,y1),(x2,y2)</box>"`` (ints). ``box`` may also be a list of boxes and a
    dict may hold only ``ref``."""
    out: list[str] = []
    n_images = 0
    for item in items:
        if "image" in item:
            n_images += 1
            out.append(f"Picture {n_images}: {IMG_START}{item['image']}{IMG_END}\n")
        elif "text" in item:
            out.append(item["text"])
        elif "box" in item or "ref" in item:
            if item.get("ref") is not None:
                out.append(f"{REF_START}{item['ref']}{REF_END}")
            box = item.get("box")
            boxes = [] if box is None else [box] if _is_single_box(box) else list(box)
            for x1, y1, x2, y2 in boxes:
                out.append(f"{BOX_START}({int(x1)},{int(y1)}),({int(x2)},{int(y2)}){BOX_END}")
        else:
            raise ValueError(f"list-format item needs an 'image', 'text', 'box' or 'ref' key: {item!r}")
    return "".join(out)


def to_list_format(text: str) -> list[dict[str, Any]]:
    """Parse a query or a grounded reply back into list format (inverse of :func:`from_list_format`
    for the strings it builds). ``"Picture n: "`` before an image and one ``"\\n"`` after it are
    absorbed into the image item; a ``<ref>`` directly followed by a ``<box>`` gives one item
    ``{'ref': r, 'box': (x1, y1, x2, y2)}``, each further box its own ``{'box': ...}`` item; a ref
    without a box gives ``{'ref': r}``. Boxes that do not parse stay text."""
    items: list[dict[str, Any]] = []
    pos = 0

    def add_text(s: str) -> None:
        if not s:
            return
        if items and set(items[-1]) == {"text"}:
            items[-1]["text"] += s
        else:
            items.append({"text": s})

    for m in _LIST_RE.finditer(text):
        gap = text[pos : m.start()]
        add_text(gap)
        pos = m.end()
        if m.group("image") is not None:
            items.append({"image": m.group("image")})
        elif m.group("ref") is not None:
            items.append({"ref": m.group("ref")})
        else:
            box = tuple(int(m.group(k)) for k in ("x1", "y1", "x2", "y2"))
            if not gap and items and set(items[-1]) == {"ref"}:
                items[-1]["box"] = box  # a ref names the box right after it
            else:
                items.append({"box": box})
    add_text(text[pos:])
    return items


# --------------------------------------------------------------------------------------------------
# Tokenizer


class QWenTokenizer(PreTrainedTokenizer):
    """Qwen-VL tokenizer on :class:`tiktoken.Encoding` (see the module docstring for ids and policy).

    Args:
        vocab_file: path to a ``qwen.tiktoken`` file (``base64(bytes) rank`` per line).
        errors: how undecodable UTF-8 is handled by ``decode`` (``bytes.decode`` ``errors``).
        allowed_special: default for :meth:`encode_text`: ``None``/``"none"`` (injection-safe),
            ``"all"`` (official behaviour) or a set of special-token strings.
        mergeable_ranks: an in-memory ``{token_bytes: rank}`` instead of ``vocab_file``.

    Ordinary tokens (``tokenize``/``convert_ids_to_tokens``) are ``bytes``, special tokens ``str``, as in
    the official tokenizer.
    """

    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | os.PathLike | None = None,
        errors: str = "replace",
        allowed_special: AllowedSpecial = None,
        mergeable_ranks: Mapping[bytes, int] | None = None,
        image_span: int = IMAGE_SPAN,
        **kwargs: Any,
    ) -> None:
        # ids between <img> and </img> = the model's visual n_queries (256 for Qwen-VL, fewer for qvlq-mini)
        self.image_span = int(image_span)
        if mergeable_ranks is None:
            if vocab_file is None:
                raise ValueError(f"QWenTokenizer needs vocab_file (a {VOCAB_FILE}) or mergeable_ranks")
            mergeable_ranks = load_tiktoken_ranks(vocab_file)
        else:
            mergeable_ranks = dict(mergeable_ranks)
        _check_ranks(mergeable_ranks)

        # Everything the HF base __init__ may call back into must exist before super().__init__.
        self.vocab_file = None if vocab_file is None else str(vocab_file)
        self.errors = errors
        self.num_ranks = n = len(mergeable_ranks)
        self._ranks = mergeable_ranks
        self._id_to_bytes: list[bytes] = [b""] * n
        for tok, rank in mergeable_ranks.items():
            self._id_to_bytes[rank] = tok
        self.special_token_ids: dict[str, int] = {tok: n + k for k, tok in enumerate(SPECIAL_TOKENS)}
        self._id_to_special: dict[int, str] = {v: k for k, v in self.special_token_ids.items()}
        self._encoding = tiktoken.Encoding(
            "qwen", pat_str=PAT_STR, mergeable_ranks=mergeable_ranks, special_tokens=self.special_token_ids
        )
        self._vocab: dict[bytes | str, int] | None = None
        self.allowed_special = allowed_special
        self._resolve_allowed(allowed_special)  # fail early on a bad value

        ids = self.special_token_ids
        self.eod_id = ids[ENDOFTEXT]
        self.im_start_id, self.im_end_id = ids[IM_START], ids[IM_END]
        self.ref_start_id, self.ref_end_id = ids[REF_START], ids[REF_END]
        self.box_start_id, self.box_end_id = ids[BOX_START], ids[BOX_END]
        self.quad_start_id, self.quad_end_id = ids[QUAD_START], ids[QUAD_END]
        self.img_start_id, self.img_end_id, self.img_pad_id = ids[IMG_START], ids[IMG_END], ids[IMG_PAD]

        # Our special ids are fixed by the vocab size; a saved `added_tokens_decoder` cannot move them.
        kwargs.pop("added_tokens_decoder", None)
        self._added_tokens_decoder = {
            i: AddedToken(t, lstrip=False, rstrip=False, normalized=False, special=True)
            for t, i in self.special_token_ids.items()
        }
        kwargs.setdefault("eos_token", ENDOFTEXT)
        kwargs.setdefault("pad_token", ENDOFTEXT)
        # Listing all of them makes HF's all_special_ids / skip_special_tokens complete.
        kwargs.setdefault("extra_special_tokens", [t for t in SPECIAL_TOKENS if t != ENDOFTEXT])
        kwargs.setdefault("model_max_length", DEFAULT_MODEL_MAX_LENGTH)
        super().__init__(
            errors=errors, allowed_special=_jsonable_allowed(allowed_special), image_span=self.image_span, **kwargs
        )

    def __repr__(self) -> str:
        # HF's repr lists every added token (217 lines here).
        return (
            f"{type(self).__name__}(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
            f"model_max_length={self.model_max_length}, padding_side={self.padding_side!r}, "
            f"allowed_special={self.allowed_special!r})"
        )

    # ---- sizes and vocab -------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.num_ranks + NUM_SPECIAL

    def __len__(self) -> int:
        return self.num_ranks + NUM_SPECIAL

    def get_vocab(self) -> dict[bytes | str, int]:
        """``{token_bytes: id}`` for BPE ranks plus ``{special_str: id}`` (a fresh dict)."""
        if self._vocab is None:
            self._vocab = {**self._ranks, **self.special_token_ids}
        return dict(self._vocab)

    @property
    def mergeable_ranks(self) -> dict[bytes, int]:
        return dict(self._ranks)

    def _add_tokens(self, new_tokens: Sequence[str | AddedToken], special_tokens: bool = False) -> int:
        # The vocabulary is fixed (the model has exactly N + 217 live rows); the 205 <|extra_k|> tokens
        # are the reserved room for new special tokens.
        unknown = [str(t) for t in new_tokens if str(t) not in self.special_token_ids]
        if unknown:
            raise ValueError(
                f"QWenTokenizer cannot add tokens {unknown[:5]}: its vocabulary is fixed; "
                "use one of the reserved <|extra_0|>..<|extra_204|> special tokens instead"
            )
        return 0

    # ---- encoding --------------------------------------------------------------------------------

    def _resolve_allowed(self, allowed_special: AllowedSpecial) -> frozenset[str]:
        if allowed_special is None:
            allowed_special = self.allowed_special
        if allowed_special is None or allowed_special == "none":
            allowed: set[str] = set()
        elif allowed_special == "all":
            allowed = set(SPECIAL_TOKENS) - IMAGE_TAGS
        elif isinstance(allowed_special, str):
            raise ValueError(
                f"allowed_special must be 'all', 'none', None or a set of tokens, not {allowed_special!r}"
            )
        else:
            allowed = set(allowed_special)
            unknown = allowed - set(SPECIAL_TOKENS)
            if unknown:
                raise ValueError(f"allowed_special has unknown special tokens: {sorted(unknown)}")
            allowed -= IMAGE_TAGS
        return frozenset(allowed | MARKUP_TAGS)

    def _encode_plain(self, text: str, allowed: frozenset[str]) -> list[int]:
        if not text:
            return []
        # disallowed_special=() turns tiktoken's "special string in text" error into plain-text encoding.
        return self._encoding.encode(text, allowed_special=allowed, disallowed_special=())

    def encode_image(self, path: str) -> list[int]:
        """The 258 ids of one image reference: ``<img>``, path bytes as ids, ``<imgpad>``..., ``</img>``.

        ``path`` is encoded as given (no NFC); :meth:`encode_text` normalises it with the rest of the text.
        """
        data = path.encode("utf-8")
        if len(data) >= self.image_span:
            raise ValueError(
                f"image path/URL is {len(data)} UTF-8 bytes; at most {self.image_span - 1} fit in an image span "
                f"(the model needs at least one <imgpad>): {path[:60]!r}..."
            )
        return [self.img_start_id, *data, *[self.img_pad_id] * (self.image_span - len(data)), self.img_end_id]

    def encode_text(self, text: str, allowed_special: AllowedSpecial = None) -> list[int]:
        """Token ids of ``text`` (no special tokens added around it): NFC, image spans, markup tags;
        special-token strings follow ``allowed_special`` (default: the constructor's, i.e. plain text)."""
        text = unicodedata.normalize("NFC", text)
        allowed = self._resolve_allowed(allowed_special)
        ids: list[int] = []
        pos = 0
        for m in _IMAGE_SPAN_RE.finditer(text):
            ids += self._encode_plain(text[pos : m.start()], allowed)
            ids += self.encode_image(m.group(1))
            pos = m.end()
        ids += self._encode_plain(text[pos:], allowed)
        return ids

    def tokenize(self, text: str, allowed_special: AllowedSpecial = None, **kwargs: Any) -> list[bytes | str]:
        """HF entry point (``__call__``/``encode`` go through here): tokens of :meth:`encode_text`.
        Other HF kwargs (``split_special_tokens`` ...) are ignored; use ``allowed_special``."""
        return [self._id_to_token(i) for i in self.encode_text(text, allowed_special)]

    def _id_to_token(self, index: int) -> bytes | str:
        if 0 <= index < self.num_ranks:
            return self._id_to_bytes[index]
        if index in self._id_to_special:
            return self._id_to_special[index]
        raise ValueError(f"token id {index} is outside the tokenizer's {len(self)} ids")

    def _convert_id_to_token(self, index: int) -> bytes | str:
        return self._id_to_token(index)

    def _convert_token_to_id(self, token: bytes | str) -> int:
        if isinstance(token, (bytes, bytearray)):
            idx = self._ranks.get(bytes(token))
        else:
            idx = self.special_token_ids.get(token)
            if idx is None:
                idx = self._ranks.get(token.encode("utf-8"))
        if idx is None:
            raise ValueError(f"{token!r} is not a token of this vocabulary")
        return idx

    def convert_tokens_to_ids(self, tokens: bytes | str | Iterable[bytes | str]) -> int | list[int]:
        # HF's version treats a bytes token as a sequence of ints.
        if isinstance(tokens, (str, bytes, bytearray)):
            return self._convert_token_to_id(tokens)
        return [self._convert_token_to_id(t) for t in tokens]

    # ---- decoding --------------------------------------------------------------------------------

    def _decode_bytes(self, ids: Sequence[int], skip_special_tokens: bool = False) -> bytes:
        out = bytearray()
        n_ranks, total, pad = self.num_ranks, len(self), self.img_pad_id
        i, n = 0, len(ids)
        while i < n:
            t = ids[i]
            i += 1
            if 0 <= t < n_ranks:
                out += self._id_to_bytes[t]
            elif t == self.img_start_id:
                # Image span: ids are raw path bytes; pads dropped; image markup survives skip_special_tokens.
                out += IMG_START.encode()
                while i < n and (0 <= ids[i] < 256 or ids[i] == pad):
                    if ids[i] != pad:
                        out.append(ids[i])
                    i += 1
                if i < n and ids[i] == self.img_end_id:
                    out += IMG_END.encode()
                    i += 1
            elif n_ranks <= t < total:
                if not skip_special_tokens:
                    out += self._id_to_special[t].encode()
            # else: ids past the tokenizer (the model's 76 padding rows) carry no text; skip them.
        return bytes(out)

    def _decode(
        self,
        token_ids: int | Sequence[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        errors: str | None = None,
        **kwargs: Any,
    ) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        text = self._decode_bytes([int(t) for t in token_ids], skip_special_tokens).decode(
            "utf-8", errors=errors or self.errors
        )
        if clean_up_tokenization_spaces:
            text = self.clean_up_tokenization(text)
        return text

    def convert_tokens_to_string(self, tokens: Sequence[bytes | str]) -> str:
        return self._decode(self.convert_tokens_to_ids(list(tokens)))

    # ---- list format -----------------------------------------------------------------------------

    def from_list_format(self, items: Iterable[Mapping[str, Any]]) -> str:
        """See :func:`from_list_format`."""
        return from_list_format(items)

    def to_list_format(self, text: str) -> list[dict[str, Any]]:
        """See :func:`to_list_format`."""
        return to_list_format(text)

    # ---- saving ----------------------------------------------------------------------------------

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        path = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE)
        write_tiktoken_ranks(path, self._ranks)
        return (path,)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        legacy_format: bool | None = None,
        filename_prefix: str | None = None,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> tuple[str, ...]:
        """Write ``qwen.tiktoken`` and a ``tokenizer_config.json`` in the official shape
        (``model_max_length``, ``tokenizer_class``, ``auto_map``; qvlq options only when not default)."""
        if push_to_hub:
            raise NotImplementedError("save_pretrained to a folder, then upload it with huggingface_hub")
        files = super().save_pretrained(save_directory, legacy_format, filename_prefix, **kwargs)
        cfg_path = Path(save_directory) / (
            (filename_prefix + "-" if filename_prefix else "") + "tokenizer_config.json"
        )
        written = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg_path.write_text(json.dumps(self._official_config(written), indent=2, ensure_ascii=False) + "\n")
        # HF lists added_tokens.json even when it had nothing to write.
        return tuple(f for f in files if os.path.exists(f))

    def _official_config(self, written: dict[str, Any]) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "model_max_length": self.model_max_length,
            "tokenizer_class": "QWenTokenizer",
            "auto_map": self.init_kwargs.get("auto_map") or OFFICIAL_AUTO_MAP,
        }
        if self.errors != "replace":
            cfg["errors"] = self.errors
        if self.image_span != IMAGE_SPAN:
            cfg["image_span"] = self.image_span
        if self.allowed_special not in (None, "none"):
            cfg["allowed_special"] = _jsonable_allowed(self.allowed_special)
        non_default = {
            "eos_token": str(self.eos_token) != ENDOFTEXT,
            "pad_token": str(self.pad_token) != ENDOFTEXT,
            "padding_side": self.padding_side != "right",
            "truncation_side": self.truncation_side != "right",
            "chat_template": "chat_template" in written,
            "processor_class": "processor_class" in written,
        }
        for key, keep in non_default.items():
            if keep and key in written:
                cfg[key] = written[key]
        return cfg


def _jsonable_allowed(allowed_special: AllowedSpecial) -> str | list[str] | None:
    # init_kwargs end up in tokenizer_config.json: sets are not JSON.
    if allowed_special is None or isinstance(allowed_special, str):
        return allowed_special
    return sorted(allowed_special)


__all__ = [
    "QWenTokenizer",
    "load_tiktoken_ranks",
    "write_tiktoken_ranks",
    "from_list_format",
    "to_list_format",
    "SPECIAL_TOKENS",
    "PAT_STR",
]
