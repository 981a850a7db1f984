"""qvlq quantize end to end on the tiny checkpoint (CPU): the official Int4 layout, numerics, resume,
bad inputs, LoRA adapters and act-order.

One tiny checkpoint (bf16, like the official source; c_attn biases and norm weights made non-trivial so
the bias / untouched-tensor checks can fail) and one 6-sample multimodal calibration bundle (mini task
suite pictures, max_len 400) are shared by every test; the baseline quantization runs once per module.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / ".." / "shared" / "reference"
INT4_REF = REFERENCE / "qwen-vl-chat-int4"
QUANTIZED = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")
QUANT_RE = re.compile(r"(transformer\.h\.\d+\.(?:attn\.c_attn|attn\.c_proj|mlp\.w1|mlp\.w2|mlp\.c_proj))\.weight")
SYM4_QZEROS = 0x77777777  # zero 8 stored as 7 in every nibble
N_SAMPLES, MAX_LEN = 6, 400
# Intra-op threads, here and in the killed subprocesses: fp32 results (so the bytes) depend on the thread
# count, and byte-identity across processes needs the same one. One thread also keeps the module fast on
# a busy 2-core box (OpenMP spin-waits under oversubscription made it 3x slower).
THREADS = 1
# Largest relative logits error (||q - f|| / ||f||) of the quantized tiny model against the float one.
# Observed ~0.008-0.010 (GPTQ, with and without act-order); RTN on the same groups gives ~0.047.
LOGITS_REL_BOUND = 0.03
SENTINEL_PY = """\
import pathlib
pathlib.Path(__file__).with_name("IMPORTED").write_text("modeling_qwen.py was imported")
raise RuntimeError("qvlq must never import modeling_qwen.py from a model directory")
"""


# ------------------------------------------------------------------------------------------------ helpers


def _expected_int4(config) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The spec's section 8 rules applied to the float inventory (4 bit, group 128)."""
    from qvlq.checkpoint import tensor_inventory

    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name, shape in tensor_inventory(config).items():
        m = QUANT_RE.fullmatch(name)
        if m is None:
            if not (name.endswith(".bias") and QUANT_RE.fullmatch(name[: -len(".bias")] + ".weight")):
                out[name] = (tuple(shape), torch.float16)
            continue
        o, i = shape
        p = m.group(1)
        out[f"{p}.qweight"] = ((i // 8, o), torch.int32)
        out[f"{p}.qzeros"] = ((i // 128, o // 8), torch.int32)
        out[f"{p}.scales"] = ((i // 128, o), torch.float16)
        out[f"{p}.g_idx"] = ((i,), torch.int32)
        out[f"{p}.bias"] = ((o,), torch.float16)
    return out


def _index(d: Path) -> dict:
    return json.loads((d / "model.safetensors.index.json").read_text())


def _meta(d: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    dtypes = {"F16": torch.float16, "I32": torch.int32, "BF16": torch.bfloat16, "F32": torch.float32}
    out = {}
    for f in sorted(set(_index(d)["weight_map"].values())):
        with safe_open(str(d / f), "pt") as sf:
            for k in sf.keys():  # noqa: SIM118 (safe_open API)
                sl = sf.get_slice(k)
                out[k] = (tuple(sl.get_shape()), dtypes[sl.get_dtype()])
    return out


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(set(_index(d)["weight_map"].values())):
        out.update(load_file(str(d / f)))
    return out


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def _assert_same_bytes(a: Path, b: Path) -> None:
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    differ = [n for n in fa if fa[n] != fb[n]]
    assert not differ, f"files differ between {a.name} and {b.name}: {differ}"


def _beside(out: Path) -> list[str]:
    """Everything qvlq may leave next to `out`: the directory itself, temp dirs, the work dir."""
    return sorted(p.name for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}."))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _cli(*args: str):
    from typer.testing import CliRunner

    from qvlq.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _stderr(res) -> str:
    try:
        return res.stderr
    except ValueError:  # older click: stderr mixed into output
        return res.output


def _assert_clean_failure(res, out: Path, pattern: str, keep: tuple[str, ...] = ()) -> str:
    err = _stderr(res)
    assert res.exit_code == 2, (res.exit_code, res.output, repr(res.exception))
    assert "Traceback" not in res.output + err
    # one error line, the last thing printed (a run that got going printed its start line and progress first)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert re.search(pattern, errors[0], re.IGNORECASE), errors[0]
    assert _beside(out) == sorted(keep), f"left beside --out: {_beside(out)}"
    return errors[0]


def _logits(model, sample) -> torch.Tensor:
    with torch.inference_mode():
        return model(**sample.model_inputs()).logits.float()


def _rtn(w: torch.Tensor, group: int = 128) -> torch.Tensor:
    """Round-to-nearest symmetric 4-bit per (row, 128-column group), the baseline GPTQ must beat."""
    o, i = w.shape
    g = w.float().reshape(o, i // group, group)
    scale = (2 * g.abs().amax(-1, keepdim=True) / 15).clamp(min=1e-12)
    q = (torch.round(g / scale) + 8).clamp(0, 15)
    return ((q - 8) * scale).reshape(o, i).to(w.dtype)


def _run_and_kill(cmd: list[str], ready, timeout: float = 300.0) -> None:
    """Start cmd, wait until ready() is true while it runs, then SIGKILL it."""
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None:
                pytest.fail(
                    f"quantize ended (rc {proc.returncode}) before the kill point: {proc.stderr.read()[-2000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail("timed out waiting for the kill point")
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
        proc.stderr.close()


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module", autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def qdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("quantize")


@pytest.fixture(scope="module")
def src(qdir: Path) -> Path:
    """The tiny checkpoint in bf16, c_attn biases and norm weights randomised, a booby-trapped
    modeling_qwen.py beside it."""
    from qvlq.checkpoint import init_checkpoint

    d = qdir / "src"
    init_checkpoint(d, "tiny", seed=0, dtype="bf16")
    g = torch.Generator().manual_seed(1234)
    for f in sorted(set(_index(d)["weight_map"].values())):
        sd = load_file(str(d / f))
        for k, v in sd.items():
            if k.endswith("attn.c_attn.bias"):
                sd[k] = (torch.randn(v.shape, generator=g) * 0.05).to(v.dtype)
            elif re.search(r"\.(ln_1|ln_2|ln_f)\.weight$", k):
                sd[k] = (1 + torch.randn(v.shape, generator=g) * 0.1).to(v.dtype)
        save_file(sd, str(d / f), metadata={"format": "pt"})
    (d / "modeling_qwen.py").write_text(SENTINEL_PY)
    return d


@pytest.fixture(scope="module")
def data_json(qdir: Path) -> Path:
    from qvlq.mini.tasks import generate_suite, write_finetune_json

    return write_finetune_json(generate_suite(N_SAMPLES, seed=0, split="calib"), qdir / "data", "calib")


@pytest.fixture(scope="module")
def bundle(qdir: Path, src: Path, data_json: Path) -> Path:
    from qvlq.calibrate import build_bundle, save_bundle
    from qvlq.model.loading import read_config
    from qvlq.tokenizer import QWenTokenizer

    tok = QWenTokenizer.from_pretrained(str(src))
    calib = build_bundle(data_json, tok, read_config(src), num_samples=N_SAMPLES, max_len=MAX_LEN)
    assert len(calib) == N_SAMPLES and calib.stats.images == N_SAMPLES
    return save_bundle(calib, qdir / "bundle")


@pytest.fixture(scope="module")
def calib(bundle: Path):
    """Loaded from the bundle, exactly as `qvlq quantize --calib BUNDLE` does (same fingerprint, same log)."""
    from qvlq.calibrate import load_bundle

    return load_bundle(bundle)


@pytest.fixture(scope="module")
def base(qdir: Path, src: Path, calib):
    """(out dir, QuantizeResult) of the default (official) configuration."""
    from qvlq.quantize import quantize

    out = qdir / "base"
    events: list[str] = []
    result = quantize(src, calib, out, device="cpu", on_event=lambda kind, **e: events.append(kind))
    assert events[0] == "start" and events[-1] == "write" and events.count("block_done") == 2
    assert _beside(out) == ["base"]  # work dir and temp dirs removed
    return out, result


@pytest.fixture(scope="module")
def float_model(src: Path):
    from qvlq.model.modeling import QWenLMHeadModel

    return QWenLMHeadModel.from_pretrained(src, dtype="fp32")


@pytest.fixture(scope="module")
def float_logits(float_model, calib) -> torch.Tensor:
    return _logits(float_model, calib[0])


def _check_quantized_model(out: Path, calib, float_logits: torch.Tensor) -> tuple[object, float]:
    from qvlq.int4 import QuantLinear
    from qvlq.model.modeling import QWenLMHeadModel

    model = QWenLMHeadModel.from_pretrained(out, dtype="fp32")
    qls = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(qls) == 2 * len(QUANTIZED)
    rel = _rel(_logits(model, calib[0]), float_logits)
    assert rel < LOGITS_REL_BOUND, rel
    return model, rel


# ------------------------------------------------------------------------------------------------ 1. inventory


def test_int4_inventory_matches_official_index():
    from qvlq.checkpoint import preset_config
    from qvlq.gptq import QuantSpec
    from qvlq.quantize import int4_inventory

    index = json.loads((INT4_REF / "model.safetensors.index.json").read_text())
    config = preset_config("full")
    inv = int4_inventory(config, QuantSpec())
    assert sorted(inv) == sorted(index["weight_map"])
    expected = _expected_int4(config)
    assert inv == expected
    assert sum(1 for k in inv if k.endswith(".qweight")) == 160
    quant_biases = [k for k in inv if k.endswith(".bias") and f"{k[: -len('.bias')]}.qweight" in inv]
    assert len(quant_biases) == 160 and all(inv[k][1] == torch.float16 for k in quant_biases)
    total = sum(int(torch.Size(s).numel()) * torch.empty((), dtype=dt).element_size() for s, dt in inv.values())
    assert total == index["metadata"]["total_size"] == 9_731_786_240


# ------------------------------------------------------------------------------------------------ 2. output files


def test_config_and_quantize_config(base):
    out, _ = base
    ref_cfg = json.loads((INT4_REF / "config.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert sorted(cfg) == sorted(ref_cfg)
    assert cfg["quantization_config"] == ref_cfg["quantization_config"]
    assert cfg["quantization_config"]["quant_method"] == "gptq"
    assert (cfg["fp16"], cfg["bf16"], cfg["fp32"], cfg["torch_dtype"]) == (True, False, False, "float16")
    ref_qc = json.loads((INT4_REF / "quantize_config.json").read_text())
    qc = json.loads((out / "quantize_config.json").read_text())
    assert list(qc) == list(ref_qc) and len(qc) == 9
    assert qc == ref_qc


def test_index_matches_inventory(base, src):
    from qvlq.gptq import QuantSpec
    from qvlq.model.loading import read_config
    from qvlq.quantize import int4_inventory

    out, _ = base
    config = read_config(src)
    inv = int4_inventory(config, QuantSpec())
    assert inv == _expected_int4(config)
    meta = _meta(out)
    assert meta == inv
    index = _index(out)
    assert sorted(index["weight_map"]) == sorted(inv)
    total = sum(int(torch.Size(s).numel()) * torch.empty((), dtype=dt).element_size() for s, dt in meta.values())
    assert index["metadata"]["total_size"] == total


def test_qzeros_biases_and_untouched_tensors(base, src):
    out, _ = base
    q, f = _tensors(out), _tensors(src)
    assert all(v.dtype == torch.bfloat16 for v in f.values())
    n_q = 0
    for name in q:
        if name.endswith(".qzeros"):
            n_q += 1
            assert bool((q[name] == SYM4_QZEROS).all()), name
    assert n_q == 10
    for b in range(2):
        for mod in QUANTIZED:
            p = f"transformer.h.{b}.{mod}"
            if f"{p}.bias" in f:
                assert mod == "attn.c_attn"
                assert f[f"{p}.bias"].abs().max() > 0  # the fixture made it non-zero
                assert torch.equal(q[f"{p}.bias"].view(torch.int16), f[f"{p}.bias"].half().view(torch.int16))
            else:
                assert torch.count_nonzero(q[f"{p}.bias"]) == 0, p
    untouched = [
        k
        for k in q
        if not re.search(r"\.(qweight|qzeros|scales|g_idx|bias)$", k) or k.startswith("transformer.visual.")
    ]
    assert set(untouched) == {k for k in f if not QUANT_RE.fullmatch(k) and not k.endswith("attn.c_attn.bias")}
    assert any(k.startswith("transformer.visual.attn_pool.") for k in untouched)
    for k in ("transformer.wte.weight", "lm_head.weight", "transformer.ln_f.weight", "transformer.h.1.ln_2.weight"):
        assert k in untouched
    for k in untouched:
        assert q[k].dtype == torch.float16, k
        assert torch.equal(q[k].view(torch.int16), f[k].to(torch.float16).view(torch.int16)), k


def test_packed_weights_dequantize_close_to_float(base, src):
    """Orientation/packing sanity: every dequantized module is a 4-bit approximation of its float weight."""
    from qvlq.int4 import dequantize_gptq_v1

    out, _ = base
    q, f = _tensors(out), _tensors(src)
    for b in range(2):
        for mod in QUANTIZED:
            p = f"transformer.h.{b}.{mod}."
            w = dequantize_gptq_v1(q[p + "qweight"], q[p + "qzeros"], q[p + "scales"], q[p + "g_idx"])
            ref = f[p + "weight"].float()
            assert torch.equal(q[p + "g_idx"], torch.arange(ref.shape[1], dtype=torch.int32) // 128)
            assert _rel(w, ref) < 0.2, (p, _rel(w, ref))


def test_copied_files_and_nothing_imported(base, src):
    out, _ = base
    for name in ("generation_config.json", "tokenizer_config.json", "qwen.tiktoken", "modeling_qwen.py"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert not (src / "IMPORTED").exists() and not (out / "IMPORTED").exists()
    assert "modeling_qwen" not in sys.modules


def test_quantize_log(base, calib):
    out, result = base
    log = json.loads((out / "quantize_log.json").read_text())
    assert "seconds" not in log and "peak_rss_bytes" not in log and "resumed_blocks" not in log
    mods = log["modules"]
    assert [(m["block"], m["module"]) for m in mods] == [(b, n) for b in range(2) for n in QUANTIZED]
    assert all("seconds" not in m for m in mods)
    n_tokens = sum(s.n_tokens for s in calib)
    assert all(m["samples"] == n_tokens for m in mods)
    worse = [(m["block"], m["module"], m["gptq_loss"], m["rtn_loss"]) for m in mods if m["gptq_loss"] >= m["rtn_loss"]]
    assert not worse, worse
    assert all(m["gptq_loss"] > 0 for m in mods)
    assert log["calibration"]["images"] == N_SAMPLES
    assert [dataclasses.asdict(m)["gptq_loss"] for m in result.modules] == [m["gptq_loss"] for m in mods]


# ------------------------------------------------------------------------------------------------ 3. native load


def test_native_load_logits_close_and_chat(base, src, calib, float_model, float_logits, data_json, tokenizer):
    from qvlq.model.modeling import QWenLMHeadModel

    out, _ = base
    model, rel = _check_quantized_model(out, calib, float_logits)
    # GPTQ must beat round-to-nearest on the same groups, end to end.
    rtn = QWenLMHeadModel.from_pretrained(src, dtype="fp32")
    with torch.no_grad():
        for block in rtn.transformer.h:
            for mod in QUANTIZED:
                lin = block.get_submodule(mod)
                lin.weight.copy_(_rtn(lin.weight))
    rtn_rel = _rel(_logits(rtn, calib[0]), float_logits)
    assert rel < rtn_rel, (rel, rtn_rel)
    # greedy chat with a picture
    img = data_json.parent / "images" / f"{calib[0].id}.png"
    query = f"Picture 1: <img>{img}</img>\nWhat color is the shape?"
    response, history = model.chat(tokenizer, query, do_sample=False, max_new_tokens=4)
    assert isinstance(response, str) and history == [(query, response)]
    again, _ = model.chat(tokenizer, query, do_sample=False, max_new_tokens=4)
    assert again == response
    # the config's own dtype (fp16) is what a plain from_pretrained gives
    assert QWenLMHeadModel.from_pretrained(out).dtype == torch.float16
    assert "modeling_qwen" not in sys.modules and not (out / "IMPORTED").exists()


# ------------------------------------------------------------------------------------------------ 4. resume


def _quantize_cmd(src: Path, bundle: Path, out: Path, *extra: str) -> list[str]:
    return ["quantize", str(src), "--calib", str(bundle), "--out", str(out), "--device", "cpu", *extra]


def test_two_runs_byte_identical(base, src, bundle, qdir):
    out = qdir / "rerun"
    res = _cli(*_quantize_cmd(src, bundle, out))
    assert res.exit_code == 0, (res.output, repr(res.exception))
    _assert_same_bytes(base[0], out)
    assert _beside(out) == [out.name]


def test_resume_after_kill_mid_run_and_disk_full(base, src, bundle, qdir, monkeypatch):
    """SIGKILL once block 0 is checkpointed; the resumed run then hits ENOSPC while writing the shards
    (no --out, no temp dir, only the work dir is kept); the next --resume ends byte-identical."""
    import qvlq.io
    import qvlq.quantize

    out, work = qdir / "killed-mid", qdir / ".killed-mid.qvlq-work"
    cmd = [sys.executable, "-m", "qvlq.cli", *_quantize_cmd(src, bundle, out)]
    _run_and_kill(cmd, lambda: (work / "block_0000.safetensors").is_file())
    assert not out.exists()  # killed while block 1 was being quantized (or, at worst, before the write)
    block0_mtime = (work / "block_0000.safetensors").stat().st_mtime_ns

    real_save, calls = qvlq.io.save_file, []

    def disk_full(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # the second shard: half written, then the disk is full
            Path(filename).write_bytes(b"\0" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(tensors, filename, metadata=metadata)

    with monkeypatch.context() as m:
        m.setattr(qvlq.io, "save_file", disk_full)
        m.setattr(qvlq.quantize, "MAX_SHARD_BYTES", 20_000_000)  # several shards, so one lands before the fault
        res = _cli(*_quantize_cmd(src, bundle, out, "--resume"))
    assert len(calls) == 2
    _assert_clean_failure(res, out, "no space left", keep=(work.name,))
    assert (work / "block_0001.safetensors").is_file()
    assert (work / "block_0000.safetensors").stat().st_mtime_ns == block0_mtime  # replayed, not redone

    res = _cli(*_quantize_cmd(src, bundle, out, "--resume"))
    assert res.exit_code == 0, (res.output, repr(res.exception))
    _assert_same_bytes(base[0], out)
    assert _beside(out) == [out.name]


def test_resume_after_kill_before_first_block(base, src, bundle, calib, qdir):
    from qvlq.quantize import quantize

    out, work = qdir / "killed-early", qdir / ".killed-early.qvlq-work"

    def started() -> bool:
        try:
            return "fingerprint" in json.loads((work / "state.json").read_text())
        except (OSError, ValueError):
            return False

    cmd = [sys.executable, "-m", "qvlq.cli", *_quantize_cmd(src, bundle, out)]
    _run_and_kill(cmd, started)
    assert not out.exists() and not (work / "block_0000.safetensors").exists()

    # another calibration set or another spec must not continue this work dir (and must not delete it)
    fewer = dataclasses.replace(calib, samples=calib.samples[:-1])
    with pytest.raises(ValueError, match="different run"):
        quantize(src, fewer, out, device="cpu", resume=True)
    torch.set_num_threads(THREADS + 1)  # CPU results depend on the BLAS thread count
    try:
        with pytest.raises(ValueError, match="thread count"):
            quantize(src, calib, out, device="cpu", resume=True)
    finally:
        torch.set_num_threads(THREADS)
    for extra in (("--damp-percent", "0.02"), ("--desc-act",), ("--no-true-sequential",)):
        res = _cli(*_quantize_cmd(src, bundle, out, "--resume", *extra))
        _assert_clean_failure(res, out, "different run", keep=(work.name,))
    assert (work / "state.json").is_file()

    res = _cli(*_quantize_cmd(src, bundle, out, "--resume"))
    assert res.exit_code == 0, (res.output, repr(res.exception))
    _assert_same_bytes(base[0], out)
    assert _beside(out) == [out.name]


# ------------------------------------------------------------------------------------------------ 5. bad inputs


def _missing_images(tmp: Path) -> Path:
    import shutil

    from qvlq.mini.tasks import generate_suite, write_finetune_json

    path = write_finetune_json(generate_suite(3, seed=7, split="calib"), tmp / "noimg", "calib")
    shutil.rmtree(tmp / "noimg" / "images")
    return path


def _missing_images_with_text_rows(tmp: Path) -> Path:
    """Usable text-only rows beside the image rows: calibrating would silently lose the pictures."""
    rows = json.loads(_missing_images(tmp).read_text())
    rows.append(
        {"id": "text", "conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hello"}]}
    )
    (tmp / "noimg" / "mixed.json").write_text(json.dumps(rows))
    return tmp / "noimg" / "mixed.json"


def _empty_json(tmp: Path) -> Path:
    (tmp / "empty.json").write_text("[]")
    return tmp / "empty.json"


BAD_INPUTS = {
    "images_missing": (lambda t: ("src", _missing_images(t), ()), r"image.*(not found|missing)|no images"),
    "images_missing_text_rows": (
        lambda t: ("src", _missing_images_with_text_rows(t), ()),
        r"references pictures but none could be used|no images",
    ),
    "empty_calibration": (lambda t: ("src", _empty_json(t), ()), r"no usable calibration rows|empty"),
    "bits_5": (lambda t: ("src", "bundle", ("--bits", "5")), r"bits must be"),
    "group_size_96": (lambda t: ("src", "bundle", ("--group-size", "96")), r"group_size 96 does not divide"),
    "already_quantized": (lambda t: ("base", "bundle", ()), r"already quantized"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_fail_cleanly(case, src, bundle, base, tmp_path):
    make, pattern = BAD_INPUTS[case]
    model, data, extra = make(tmp_path)
    model = {"src": src, "base": base[0]}[model]
    data = bundle if data == "bundle" else data
    out = tmp_path / "out"
    res = _cli("quantize", model, "--calib", data, "--out", out, "--device", "cpu", *extra)
    _assert_clean_failure(res, out, pattern)


def test_existing_out_refused_and_untouched(src, bundle, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = _cli(*_quantize_cmd(src, bundle, out))
    assert res.exit_code == 2 and "already exists" in _stderr(res)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert _beside(out) == ["out"]


def test_empty_calibration_set_api(src, calib, tmp_path):
    from qvlq.quantize import quantize

    with pytest.raises(ValueError, match="empty calibration"):
        quantize(src, dataclasses.replace(calib, samples=[]), tmp_path / "out", device="cpu")
    assert _beside(tmp_path / "out") == []


# ------------------------------------------------------------------------------------------------ 6. LoRA


def _peft_adapter(src: Path, out: Path, **lora_kw):
    """A non-zero peft LoRA on c_attn and w1 of the tiny model: (adapter dir, merged model)."""
    peft = pytest.importorskip("peft")
    from qvlq.model.modeling import QWenLMHeadModel

    model = QWenLMHeadModel.from_pretrained(src, dtype="fp32")
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "w1"], init_lora_weights=False, **lora_kw)
    pm = peft.get_peft_model(model, cfg)
    pm.save_pretrained(str(out))
    return out, pm.merge_and_unload().eval()


@pytest.fixture(scope="module")
def adapter(qdir: Path, src: Path):
    return _peft_adapter(src, qdir / "adapter")


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_merge_matches_peft(rslora, adapter, src, qdir):
    from qvlq.lora import LoraAdapter

    path, merged = adapter if not rslora else _peft_adapter(src, qdir / "adapter-rslora", use_rslora=True)
    lora = LoraAdapter(path)
    assert lora.targets() == {f"transformer.h.{b}.{m}.weight" for b in range(2) for m in ("attn.c_attn", "mlp.w1")}
    base_sd, merged_sd = _tensors(src), merged.state_dict()
    for name in sorted(lora.targets()):
        w = base_sd[name].float()
        got = lora.merge(name, w)
        assert (got - merged_sd[name]).abs().max() <= 1e-5, name
        assert (got - w).abs().max() > 1e-3, name  # the adapter is not a no-op
    w2 = base_sd["transformer.h.0.mlp.w2.weight"]
    assert lora.merge("transformer.h.0.mlp.w2.weight", w2) is w2


def test_quantize_with_adapter(base, adapter, src, bundle, calib, qdir, float_logits):
    path, merged = adapter
    out = qdir / "with-adapter"
    res = _cli(*_quantize_cmd(src, bundle, out, "--adapter", str(path)))
    assert res.exit_code == 0, (res.output, repr(res.exception))
    q, q0 = _tensors(out), _tensors(base[0])
    assert sorted(q) == sorted(q0)
    assert not torch.equal(q["transformer.h.0.attn.c_attn.qweight"], q0["transformer.h.0.attn.c_attn.qweight"])
    assert not torch.equal(q["transformer.h.1.mlp.w1.scales"], q0["transformer.h.1.mlp.w1.scales"])
    for k in q0:
        if k.startswith("transformer.visual.") or k in ("transformer.wte.weight", "lm_head.weight"):
            assert torch.equal(q[k], q0[k]), k
    # the merged adapter survives quantization: the output tracks peft's merged model, not the base
    from qvlq.model.modeling import QWenLMHeadModel

    logits = _logits(QWenLMHeadModel.from_pretrained(out, dtype="fp32"), calib[0])
    merged_logits = _logits(merged, calib[0])
    assert _rel(logits, merged_logits) < LOGITS_REL_BOUND
    assert _rel(logits, merged_logits) < _rel(logits, float_logits)


# ------------------------------------------------------------------------------------------------ 7. act-order


@pytest.mark.parametrize("static", [True, False], ids=["static-groups", "dynamic-groups"])
def test_act_order(static, src, bundle, calib, qdir, float_logits):
    from qvlq.int4 import QuantLinear
    from qvlq.model.loading import read_config
    from qvlq.model.modeling import QWenLMHeadModel
    from qvlq.quantize import int4_inventory, spec_from_options

    out = qdir / f"act-order-{'static' if static else 'dynamic'}"
    flags = ("--desc-act", "--static-groups" if static else "--no-static-groups")
    res = _cli(*_quantize_cmd(src, bundle, out, *flags))
    assert res.exit_code == 0, (res.output, repr(res.exception))
    qc = json.loads((out / "quantize_config.json").read_text())
    assert (qc["desc_act"], qc["static_groups"]) == (True, static)
    assert json.loads((out / "config.json").read_text())["quantization_config"] == qc | {"quant_method": "gptq"}
    spec = spec_from_options(desc_act=True, static_groups=static)
    assert _meta(out) == int4_inventory(read_config(src), spec)

    q = _tensors(out)
    permuted = []
    for b in range(2):
        for mod in QUANTIZED:
            g = q[f"transformer.h.{b}.{mod}.g_idx"].long()
            contiguous = torch.arange(g.numel()) // 128
            assert torch.equal(torch.bincount(g), torch.full((g.numel() // 128,), 128))
            if static:
                assert torch.equal(g, contiguous), (b, mod)
            elif not torch.equal(g, contiguous):
                permuted.append((b, mod))
    if not static:  # only mlp.c_proj (in 384) has more than one group in the tiny model
        assert (0, "mlp.c_proj") in permuted and (1, "mlp.c_proj") in permuted, permuted

    model, rel = _check_quantized_model(out, calib, float_logits)
    assert all(m.backend == "dequant" for m in model.modules() if isinstance(m, QuantLinear))
    if hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):  # the int4 kernel path (gathers x for act-order)
        kernel = QWenLMHeadModel.from_pretrained(out, dtype="fp32", int4_backend="int4_cpu")
        assert {m.backend for m in kernel.modules() if isinstance(m, QuantLinear)} == {"int4_cpu"}
        assert _rel(_logits(kernel, calib[0]), _logits(model, calib[0])) < 1e-4


def test_act_group_aware_preset(src, bundle, base, qdir, calib, float_logits):
    """The GAR preset writes the official desc_act=false layout (contiguous g_idx, same inventory and
    quantize_config as the default run) with a lower summed GPTQ loss on the same calibration."""
    from qvlq.quantize import spec_from_options

    preset = REPO / "configs" / "int4-g128-gar.json"
    assert spec_from_options(preset).act_group_aware
    out = qdir / "gar"
    res = _cli(*_quantize_cmd(src, bundle, out, "--preset", str(preset)))
    assert res.exit_code == 0, (res.output, repr(res.exception))
    base_out, _ = base
    for name in ("quantize_config.json", "config.json"):
        assert (out / name).read_text() == (base_out / name).read_text()
    assert _meta(out) == _meta(base_out)
    q = _tensors(out)
    for key, g in q.items():
        if key.endswith(".g_idx"):
            assert torch.equal(g.long(), torch.arange(g.numel()) // 128), key
    log = json.loads((out / "quantize_log.json").read_text())
    assert log["spec"]["act_group_aware"] is True
    base_log = json.loads((base_out / "quantize_log.json").read_text())
    assert sum(m["gptq_loss"] for m in log["modules"]) < sum(m["gptq_loss"] for m in base_log["modules"])
    _check_quantized_model(out, calib, float_logits)
