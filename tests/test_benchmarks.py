"""The GPU benchmark scripts that gpu_checks.sh runs, exercised on the CPU, so that a session with a GPU does not
find them broken: int4_gemv.py --dry-run (reference checks, the Triton kernel interpreted, the mma kernel's
lane model) and its per-step summary; decode_attention.py's whole measure-check-report path with the kernel
interpreted (2 heads instead of 32) and the CUDA timing stubbed; decode_kernels.py on the tiny geometry (the
CPU profiler's operators instead of CUDA kernels)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qvlq.int4_triton import triton_error

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", COLUMNS="200")
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)


@pytest.mark.slow
def test_int4_gemv_dry_run(tmp_path: Path) -> None:
    proc = run([str(BENCH / "int4_gemv.py"), "--dry-run", "--out", "gemv.json"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "gemv.json").read_text())
    assert [r["name"] for r in data["shapes"]] == ["tiny.a", "tiny.b"]
    for r in data["shapes"]:
        assert r["pack_exact"] and r["reference_mismatch"] is None and r["mma_mismatch"] is None
        if triton_error() is None:
            assert r["triton_mismatch"] is None and not r["dropped"], r["dropped"]


def test_int4_gemv_step_summary() -> None:
    b = load("int4_gemv")
    rows = [{"name": n, "tinygemm_us": 10.0, "mma_us": 5.0} for n, _, _ in b.FULL_SHAPES]
    rows.append({"name": b.FUSED[0], "tinygemm_us": 18.0, "mma_us": 9.0, "triton_us": 1.0})
    step, fusion = b.step_summary(rows)
    assert step == pytest.approx({"tinygemm": 32 * 5 * 10 / 1e3, "mma": 32 * 5 * 5 / 1e3})
    assert fusion["tinygemm"] == pytest.approx({"w1_plus_w2_us": 20.0, "fused_us": 18.0, "step_saving_ms": 0.064})
    assert set(fusion) == {"tinygemm", "mma"}  # triton was timed on the fused shape only
    rows[-1].update(glu_us={"w4t1-glu": 8.5, "w8t1-glu": 9.5}, gate_torch_us=2.5)  # the gate in the kernel
    _, fusion = b.step_summary(rows)
    assert fusion["mma"] == pytest.approx({"w1_plus_w2_us": 10.0, "fused_us": 9.0, "step_saving_ms": 0.032,
                                           "glu_best": "w4t1-glu", "glu_us": 8.5, "gate_torch_us": 2.5,
                                           "glu_step_saving_ms": 0.096})  # fmt: skip
    del rows[2]["mma_us"]  # mlp.w1 without an mma time: no mma step, no mma fusion figure
    step, fusion = b.step_summary(rows)
    assert set(step) == {"tinygemm"} and set(fusion) == {"tinygemm"}


def test_int4_gemv_block_variants_on_cpu(monkeypatch) -> None:
    """The fused-block launches' timing code, run on the CPU op (one call stands for the CUDA graph)."""
    import argparse

    b = load("int4_gemv")
    monkeypatch.setattr(b.T, "copies_for_l2", lambda nbytes, device: 2)
    monkeypatch.setattr(b.T, "time_graph", lambda call, calls, repeats: (call(0), call(1), 1e-5)[2])
    monkeypatch.setattr(b, "BLOCK_VARIANTS", {"a": dict(norm=256), "b": dict(resid=1), "c": dict(glu=1, norm=256)})
    args = argparse.Namespace(calls=1, repeats=1)
    for name, n in (("a", 32), ("b", 48), ("c", 64)):
        codes, zeros, scales = b.random_layer(256, n, "cpu", seed=n)
        mp = b.M.pack(codes, zeros, scales, b.GROUP, torch.bfloat16)
        row = {"name": name, "mma_best": "w4t1", "configs_us": {"mma w8t1": 2.0, "mma w4t1": 1.0, "triton x": 0.5}}
        b.time_block_variant(row, mp, args)
        assert row["block_variant_best"] == "w4t1-" + b.M.flags_name(b.BLOCK_VARIANTS[name]), row
        assert list(row["block_variant_us"]) == ["w4t1-" + b.M.flags_name(b.BLOCK_VARIANTS[name]),
                                                 "w8t1-" + b.M.flags_name(b.BLOCK_VARIANTS[name])]  # fmt: skip
        assert row["block_variant_us"]["w4t1-" + b.M.flags_name(b.BLOCK_VARIANTS[name])] == pytest.approx(10.0)
        assert not row["block_variant_dropped"]


DECODE_ATTENTION = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("bench", sys.argv[1])
b = importlib.util.module_from_spec(spec)
spec.loader.exec_module(b)
b.HEADS = 2  # the interpreter runs every program in Python
b.time_graph = lambda fn, calls, repeats: (fn(0), 1e-5)[1]  # runs the timed call once, no CUDA graph
cfg = b.A.DEFAULT_CONFIG
b.A.tuned = lambda batch, heads, dim, n, dtype, device: b.A.TuneResult(cfg, {cfg.name: 1e-5}, {}, n // 2, 2e-5)
sys.exit(b.main(["--device", "cpu", "--lengths", "290", "--layers", "1", "--calls", "1", "--out", "attn.json"]))
"""


@pytest.mark.slow
@pytest.mark.skipif(triton_error() is not None, reason="needs triton (its interpreter)")
def test_decode_attention_benchmark_path(tmp_path: Path) -> None:
    proc = run(["-c", DECODE_ATTENTION, str(BENCH / "decode_attention.py")], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "attn.json").read_text())
    (length,) = data["lengths"]
    assert length["length"] == 290 and [p["position"] for p in length["positions"]] == [72, 145, 217, 288, 289]
    assert all(p["triton_mismatch"] is None for p in length["positions"])
    assert set(length["step_ms_mean_over_positions"]) == {"sdpa", "sdpa-b512", "triton"}


def test_decode_kernels_on_the_tiny_model(tmp_path: Path) -> None:
    args = ["--size", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--context", "320"]
    args += ["--compile", "off", "--fuse", "mlp"]  # (gpu_checks' step 4b passes --fuse off)
    proc = run([str(BENCH / "decode_kernels.py"), *args, "--out", "kernels.json"], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "kernels.json").read_text())
    assert set(data["precisions"]) == {"bf16", "int4"} and data["fuse"] == "mlp"
    assert data["precisions"]["int4"]["fusion"]["fused_blocks"] == 0  # (CPU: no mma layers)
    for rec in data["precisions"].values():
        assert rec["wall_ms_per_step"] > 0 and rec["kernels_per_step"] > 0 and rec["top"]
        assert rec["prompt"] == 160  # context // 2 by default


def test_profile_targets_on_the_committed_h100_report(tmp_path: Path) -> None:
    """The issue's targets against the committed H100 profile (what the stop-13 notes worked out by hand), and a
    --host-embedding report of the same run made by hand: labelled, and its lower peak meets the 10.5 GB."""
    import dataclasses

    from qvlq.profile_report import load_report, report_json

    targets = load("profile_targets")
    h100 = BENCH.parent / "reports/profile/h100-compiled-full-2026-11-27/report.json"
    checks, devices = targets.all_checks([h100])
    got = {c.target: (c.got, c.met) for c in checks}
    assert got["fast int4 % of bound @2048"] == ("63.2%", True)
    assert got["fast bf16 % of bound @8192"] == ("79.1% (partial)", True)
    assert got["fast int4/bf16 decode @2048"] == ("2.32x", False)
    assert got["fast int4/bf16 decode @8192"] == ("2.10x (a cell ran partly)", True)
    assert got["int4 encode 2048: peak / (weights + KV)"] == ("1.040", True)
    assert got["int4 encode 2048: peak allocated"] == ("11.25 GB", False)
    assert got["int4 generate 8192: peak allocated"] == ("14.41 GB", True)
    assert devices == ["h100-compiled-full-2026-11-27: NVIDIA H100 80GB HBM3"]

    report = load_report(h100)
    int4 = next(m for m in report.models if m.precision == "int4")
    table = 1_244_659_712  # 151936 x 4096 x 2 bytes
    mapped = dataclasses.replace(
        report, settings={**report.settings, "host_embedding": True},
        models=[dataclasses.replace(int4, resident_bytes=int4.resident_bytes - table, host_bytes=table)],
        speed=[c for c in report.speed if c.precision == "int4"],
        memory=[dataclasses.replace(m, allocated_bytes=m.allocated_bytes - table) for m in report.memory
                if m.precision == "int4"],
    )  # fmt: skip
    (tmp_path / "he").mkdir()
    (tmp_path / "he/report.json").write_text(json.dumps(report_json(mapped)))
    assert targets.main([str(tmp_path / "he/report.json"), "--out", str(tmp_path / "t.md"), "--json"]) == 0
    checks, _ = targets.all_checks([tmp_path / "he/report.json"])
    got = {c.target: (c.got, c.met, c.source) for c in checks}
    assert got["int4 encode 2048: peak allocated"] == ("10.00 GB", True, "he (--host-embedding)")
    assert got["int4 encode 2048: peak / (weights + KV)"][:2] == ("1.045", True)
    assert got["fast int4/bf16 decode @2048"] == ("not measured", None, "-")  # no BF16 in that report
    assert "| int4 encode 2048: peak allocated | <= 10.5 GB | 10.00 GB | yes | he (--host-embedding) |" in (
        tmp_path / "t.md").read_text()
    slower = dataclasses.replace(mapped, speed=[dataclasses.replace(c, decode_tok_s=c.decode_tok_s * 0.99,
                                                                      ttft_ms=c.ttft_ms * 1.5) for c in mapped.speed])
    (tmp_path / "he/report.json").write_text(json.dumps(report_json(slower)))
    checks, _ = targets.all_checks([h100, tmp_path / "he/report.json"])  # what the host table costs, per cell
    costs = {c.target: c.got for c in checks if c.target.startswith("cost:")}
    assert costs == {"cost: int4 fast @2048 against resident weights": "decode 0.990x, TTFT 1.50x",
                     "cost: int4 fast @8192 against resident weights": "decode 0.990x, TTFT 1.50x"}  # fmt: skip
    assert targets.main([str(tmp_path / "missing.json")]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal without CUDA")
def test_fused_logits_refuses_without_cuda(tmp_path: Path) -> None:
    """The GPU diagnostic says in one line that it needs CUDA, exits non-zero and writes nothing."""
    proc = run([str(BENCH / "fused_logits.py"), "fused", "--out", "x.json"], tmp_path)
    assert proc.returncode != 0 and proc.stderr.strip() == "fused_logits.py needs CUDA"
    assert not (tmp_path / "x.json").exists()
