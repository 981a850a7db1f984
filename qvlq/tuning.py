"""Tuning results kept on disk, so that a later process loads what an earlier one measured on this machine.

Why: the tuners (qvlq.int4's "fastest" choice, int4_mma's configs and fused variants, decode attention's
configs) check and time some 100 launches at every model or engine build, ~10-15 s a process at full size
(inferred from the profile's build times, not measured alone). Chat's first answer and each later step of a
benchmark run pay that again for the same result. Kept here, they pay it once per machine and software.

A result is keyed by what it depends on: the tuner's own key (shapes, dtypes, the candidate configs), the
device (name, compute capability), torch, CUDA and Triton versions, and a digest of the source files that
define the kernels, so a changed kernel is tuned again. What a result holds is what the tuner measured then,
with the time it was measured; reports say which results came from here. Off CUDA nothing is kept (the
tuners do not run there). $QVLQ_CACHE_DIR moves the files with the compiled kernels, "off" keeps nothing
(qvlq.io.user_cache_dir). Files that cannot be read or written only cost the tuning. A file keeps the
MAX_ENTRIES most recently measured results: a changed kernel source or tuner key leaves its old entries
behind, and they go, oldest first, instead of growing the file for ever.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from .io import atomic_write_text, user_cache_dir

T = TypeVar("T")
LOADED: list[str] = []  # "kind key" of each result this process took from disk (for reports)
DIR: Path | None = None  # where the results go instead of user_cache_dir()/tuning (the tests' own directory)
MAX_ENTRIES = 256  # per device file; a full-size model build stores ~20-40


@functools.cache
def digest(*files: str) -> str:
    """A short digest of source files (a tuner's kernel and its launch code)."""
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).read_bytes())
    return h.hexdigest()[:16]


def fingerprint(device: torch.device) -> str | None:
    """The device and software a timing holds for; None off CUDA (nothing is kept)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    index = device.index if device.index is not None else torch.cuda.current_device()
    cc = "{}.{}".format(*torch.cuda.get_device_capability(index))
    return (f"{torch.cuda.get_device_name(index)} sm{cc} torch {torch.__version__} cuda {torch.version.cuda} "
            f"triton {triton_version}")  # fmt: skip


def _path(finger: str) -> Path | None:
    root = user_cache_dir()
    folder = DIR or (root / "tuning" if root is not None else None)
    if folder is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", finger).strip("-")
    return folder / f"{slug}-{hashlib.sha256(finger.encode()).hexdigest()[:8]}.json"


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):  # none yet, or damaged: tuned again and rewritten
        return {}


def remember(
    kind: str, key: Sequence[Any], device: torch.device, tune: Callable[[], T],
    dump: Callable[[T], Any], load: Callable[[Any], T],
) -> T:  # fmt: skip
    """tune(), or the result an earlier process stored for (kind, key) on this device and software. dump makes
    the result JSON, load makes it back; an entry load cannot read is tuned again."""
    finger = fingerprint(device)
    path = _path(finger) if finger is not None else None
    if path is None:
        return tune()
    name = f"{kind} {json.dumps(list(key), default=str)}"
    entry = _read(path).get(name)
    if isinstance(entry, dict) and "value" in entry:
        try:
            value = load(entry["value"])
            LOADED.append(name)
            return value
        except (KeyError, TypeError, ValueError):
            pass
    value = tune()
    entries = _read(path)  # again: another process may have written since
    entries[name] = {"value": dump(value), "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if len(entries) > MAX_ENTRIES:
        entries = _newest(entries, name)
    try:
        atomic_write_text(path, json.dumps(entries, indent=1, sort_keys=True) + "\n")
    except OSError:  # a read-only cache: this process keeps its result in memory all the same
        pass
    return value


def _newest(entries: dict[str, Any], name: str) -> dict[str, Any]:
    """The MAX_ENTRIES most recently measured entries, `name` (this result) among them. ISO times sort as
    strings; entries without one (damaged) go first."""

    def when(n: str) -> tuple[bool, str]:
        e = entries[n]
        return n == name, str(e.get("measured", "")) if isinstance(e, dict) else ""

    return {n: entries[n] for n in sorted(entries, key=when)[-MAX_ENTRIES:]}


def summary(names: Sequence[str]) -> str:
    """LOADED entries counted by kind: "decode_attention x2, int4_mma x4"."""
    kinds = Counter(n.split(" [")[0] for n in names)
    return ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items()))


def config_list(configs: Sequence[Any]) -> list[str]:
    """The candidates of a tune, by name (part of its key: QVLQ_PDL=0 or another arch changes them)."""
    return [c.name for c in configs]


def dump_tune(result: Any) -> dict[str, Any]:
    """A tuner's TuneResult (a NamedTuple whose `best` is a Config NamedTuple) as JSON."""
    return {**result._asdict(), "best": result.best._asdict()}


def load_tune(result_type: Callable[..., T], config_type: Callable[..., Any]) -> Callable[[Any], T]:
    """dump_tune's inverse for one tuner's types."""
    return lambda d: result_type(**{**d, "best": config_type(**d["best"])})


def remember_tune(
    kind: str, key: Sequence[Any], configs: Sequence[Any], source: str, device: torch.device, tune: Callable[[], T],
    result_type: Callable[..., T], config_type: Callable[..., Any],
) -> T:  # fmt: skip
    """remember() for a config tuner: its key plus the candidate configs and the digest of its kernel's source
    file, its TuneResult kept through dump_tune / load_tune."""
    return remember(kind, (*key, config_list(configs), digest(source)), device, tune, dump_tune,
                    load_tune(result_type, config_type))  # fmt: skip


__all__ = [
    "LOADED", "config_list", "digest", "dump_tune", "fingerprint", "load_tune", "remember", "remember_tune", "summary"
]
