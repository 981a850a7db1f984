"""`init_checkpoint` writes the official Qwen-VL-Chat directory layout (compared with the reference
files), deterministically and atomically."""

from __future__ import annotations

import filecmp
import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import qvlq.checkpoint as ckpt
from qvlq.checkpoint import init_checkpoint, preset_config, tensor_inventory, total_bytes, write_model_files

REAL_VOCAB = Path(__file__).resolve().parents[1] / "qvlq" / "assets" / "qwen.tiktoken"
MODEL_FILES = {"config.json", "generation_config.json", "tokenizer_config.json", "qwen.tiktoken"}
# keys whose values legitimately differ from the published file
VOLATILE = {"transformers_version", "torch_dtype", "_name_or_path", "use_flash_attn"}


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _shards(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def _same_bytes(a: list[Path], b: list[Path]) -> bool:
    return len(a) == len(b) and all(filecmp.cmp(x, y, shallow=False) for x, y in zip(a, b, strict=True))


def test_exact_file_set(tiny_dir: Path) -> None:
    names = {p.name for p in tiny_dir.iterdir()}
    shards = {p.name for p in _shards(tiny_dir)}
    assert names == MODEL_FILES | {"model.safetensors.index.json"} | shards
    n = len(shards)
    assert shards == {f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)}


def test_config_json_matches_reference(tiny_dir: Path, reference: Path, tmp_path: Path) -> None:
    ref = _json(reference / "qwen-vl-chat" / "config.json")
    tiny = _json(tiny_dir / "config.json")
    # every official key (the HF save artefact _name_or_path aside), nothing else
    assert set(tiny) == set(ref) - {"_name_or_path"}
    assert tiny["torch_dtype"] == "float32"
    assert set(tiny["visual"]) == set(ref["visual"])

    write_model_files(tmp_path, preset_config("full"), torch.bfloat16)  # what init_checkpoint("full") writes
    full = _json(tmp_path / "config.json")
    assert set(full) == set(ref) - {"_name_or_path"}
    assert {k: v for k, v in full.items() if k not in VOLATILE} == {k: v for k, v in ref.items() if k not in VOLATILE}
    assert full["torch_dtype"] == "bfloat16" and full["use_flash_attn"] in (False, "auto")
    for f in ("generation_config.json", "tokenizer_config.json"):
        assert _json(tmp_path / f) == _json(reference / "qwen-vl-chat" / f)


def test_other_model_files_match_reference(tiny_dir: Path, reference: Path) -> None:
    assert _json(tiny_dir / "generation_config.json") == _json(reference / "qwen-vl-chat" / "generation_config.json")
    assert _json(tiny_dir / "tokenizer_config.json") == _json(reference / "qwen-vl-chat" / "tokenizer_config.json")
    vocab = (tiny_dir / "qwen.tiktoken").read_bytes()
    assert vocab == REAL_VOCAB.read_bytes()
    assert vocab == (reference / "qwen-vl-chat-int4" / "qwen.tiktoken").read_bytes()


def test_shards_and_index(tiny_dir: Path) -> None:
    index = _json(tiny_dir / "model.safetensors.index.json")
    inventory = tensor_inventory(preset_config("tiny"))
    seen: dict[str, str] = {}
    total = 0
    for shard in _shards(tiny_dir):
        with safe_open(str(shard), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():  # noqa: SIM118 (safe_open API)
                t = f.get_tensor(name)
                assert name not in seen
                seen[name] = shard.name
                assert tuple(t.shape) == inventory[name] and t.dtype == torch.float32
                total += t.numel() * t.element_size()
    assert index["weight_map"] == seen
    assert set(seen) == set(inventory)
    assert index["metadata"]["total_size"] == total == 4 * sum(math.prod(s) for s in inventory.values())


SHARD_LIMIT = 10_000_000


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ckpt.CheckpointInfo]:
    out = tmp_path_factory.mktemp("bf16") / "tiny"
    return out, init_checkpoint(out, "tiny", seed=0, max_shard_bytes=SHARD_LIMIT)  # bf16: the default


def test_deterministic_per_seed(tiny_dir: Path, bf16_dir, tmp_path: Path) -> None:
    info = init_checkpoint(tmp_path / "same", "tiny", seed=0, dtype="fp32")
    assert _same_bytes(_shards(tmp_path / "same"), _shards(tiny_dir))
    assert info.n_params == sum(math.prod(s) for s in tensor_inventory(preset_config("tiny")).values())
    assert info.total_bytes == 4 * info.n_params and info.n_shards == len(_shards(tiny_dir))

    seed0, _ = bf16_dir
    init_checkpoint(tmp_path / "other", "tiny", seed=1, max_shard_bytes=SHARD_LIMIT)
    a, b = _shards(seed0), _shards(tmp_path / "other")
    assert [x.name for x in a] == [x.name for x in b] and not _same_bytes(a, b)
    with safe_open(str(a[0]), framework="pt") as fa, safe_open(str(b[0]), framework="pt") as fb:
        assert not torch.equal(fa.get_tensor("transformer.wte.weight"), fb.get_tensor("transformer.wte.weight"))
    for x, y in zip(a, b, strict=True):
        with safe_open(str(x), framework="pt") as fx, safe_open(str(y), framework="pt") as fy:
            for k in fx.keys():  # noqa: SIM118 (safe_open API)
                same = torch.equal(fx.get_tensor(k), fy.get_tensor(k))
                # only the seeded random tensors change: norms, biases and the sin-cos table do not
                fixed = k.endswith(("attn_pool.pos_embed", "bias")) or re.search(r"\.ln_\w+\.weight$", k)
                assert same == bool(fixed), k


def test_bf16_default_and_shard_limit(tiny_dir: Path, bf16_dir) -> None:
    out, info = bf16_dir
    assert info.dtype == "bf16"
    assert _json(out / "config.json")["torch_dtype"] == "bfloat16"
    assert info.total_bytes * 2 == _json(tiny_dir / "model.safetensors.index.json")["metadata"]["total_size"]
    shards = _shards(out)
    assert len(shards) == info.n_shards > 2
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", s.name) for s in shards)
    index = _json(out / "model.safetensors.index.json")
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            names = list(f.keys())
            assert {f.get_slice(k).get_dtype() for k in names} == {"BF16"}
            nbytes = sum(2 * math.prod(f.get_slice(k).get_shape()) for k in names)
        assert nbytes <= SHARD_LIMIT or len(names) == 1  # a tensor over the limit gets a shard of its own


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_interrupted_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    with monkeypatch.context() as m:
        m.setattr(ckpt, "write_shards", boom)
        with pytest.raises(RuntimeError, match="disk full"):
            init_checkpoint(out, "tiny", seed=0, dtype="bf16")
    assert not out.exists() and _leftovers(tmp_path) == []

    calls = []

    def interrupt(name: str, nbytes: int) -> None:  # Ctrl-C in the middle of the shards
        calls.append(name)
        if len(calls) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        init_checkpoint(out, "tiny", seed=0, dtype="bf16", on_tensor=interrupt, max_shard_bytes=5_000_000)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_existing_output_is_refused_or_replaced_atomically(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        init_checkpoint(out, "tiny", seed=0)

    def ctrl_c(name: str, nbytes: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        init_checkpoint(out, "tiny", seed=0, overwrite=True, on_tensor=ctrl_c)
    assert (out / "keep.txt").read_text() == "mine"  # an interrupted overwrite keeps the old directory
    assert _leftovers(tmp_path) == ["out"]
    init_checkpoint(out, "tiny", seed=0, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert _leftovers(tmp_path) == ["out"]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown size"):
        preset_config("medium")
    with pytest.raises(ValueError, match="unknown dtype"):
        init_checkpoint("/nonexistent/never-written", "tiny", dtype="int8")


def test_full_size_bytes_without_writing() -> None:
    assert total_bytes("full", "bf16") == 2 * 9_656_935_168 == 19_313_870_336  # the BF16 chat total_size
    assert total_bytes("full", "fp32") == 4 * 9_656_935_168
    assert total_bytes("tiny", "bf16") * 2 == total_bytes("tiny", "fp32")
