"""Batch-1 int4 GEMV on the full-size shapes: qvlq's two kernels (Triton, and the tensor-core CUDA kernel of
qvlq.int4_mma; every config of each) against torch's tinygemm.

For the five quantized linears of a Qwen-7B block (group 128, random codes, scales and zero points):
max abs error of each kernel against the fp32 reference, time per call (a CUDA graph of --calls calls,
median of --repeats replays, weight copies rotated so they do not sit in L2, as 160 different layers do
not), effective bandwidth (the bytes each kernel reads: packed weight + scales/zeros, over its time)
and its share of a measured device-to-device copy bandwidth. Ends with the int4 matmul time of one
decode step (32 blocks x 5 linears) with each kernel, and what fusing mlp.w1 and mlp.w2 into one GEMV of
twice the outputs would save per step (timed as its own shape: each call has a fixed cost, launch and
ramp-up, that a fused call pays once); for the mma kernel also its glu blocks, which compute the MLP's gate
w1 * silu(w2) in the same launch, against the fused GEMV plus torch's gate (one inductor kernel); and the
FastEngine's fused-block launches (RMSNorm in the prologue of c_attn and of the gated w1 + w2, the residual add
in the epilogue of the c_proj), tuned as the engine tunes them, against the plain kernel.

    python benchmarks/int4_gemv.py --out int4-gemv.json        # CUDA; well under a minute on an H100/H200
    python benchmarks/int4_gemv.py --dry-run                   # CPU: small shapes, reference checks, the
                                                               # Triton kernel under TRITON_INTERPRET=1 when
                                                               # triton is importable, the mma kernel's model

Exit status 1 if any kernel result is wrong, or (CUDA run) neither of qvlq's kernels can run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

if "--dry-run" in sys.argv:  # before torch: importing torch._dynamo imports triton, which reads this then
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qvlq import int4_mma as M  # noqa: E402
from qvlq import int4_triton as T  # noqa: E402
from qvlq.int4 import _pack_torch_int4, _tinygemm, time_tinygemm  # noqa: E402
from qvlq.io import write_json  # noqa: E402
from qvlq.measure import measure_bandwidth  # noqa: E402

# Qwen-7B LLM inside Qwen-VL: (name, in_features K, out_features N), 32 blocks of each
FULL_SHAPES = [
    ("attn.c_attn", 4096, 12288),
    ("attn.c_proj", 4096, 4096),
    ("mlp.w1", 4096, 11008),
    ("mlp.w2", 4096, 11008),
    ("mlp.c_proj", 11008, 4096),
]
FUSED = ("mlp.w1+w2", 4096, 22016)  # timed beside the five, not counted in the step
DRY_SHAPES = [("tiny.a", 256, 64), ("tiny.b", 512, 48)]
KINDS = ("tinygemm", "triton", "mma")
BLOCKS = 32
GROUP = 128


def random_layer(k: int, n: int, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """codes uint8 [N, K], zeros int32 [G, N] in 1..16 (v1-representable), fp16-valued scales fp32 [G, N]."""
    g = torch.Generator(device=device).manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=g, device=device, dtype=torch.uint8)
    zeros = torch.randint(1, 17, (k // GROUP, n), generator=g, device=device, dtype=torch.int32)
    scales = (torch.rand(k // GROUP, n, generator=g, device=device) * 0.02 + 1e-3).half().float()
    return codes, zeros, scales


def record(row: dict[str, Any], kind: str, tune: Any, run: Any, ref: torch.Tensor) -> None:
    """Tune one of qvlq's kernels (every config checked and timed), then check its best config's output."""
    try:
        res = tune()
    except RuntimeError as e:  # no config compiled and matched
        row[f"{kind}_mismatch"] = str(e)
        return
    row["configs_us"].update({f"{kind} {c}": s * 1e6 for c, s in res.seconds.items()})
    row["dropped"].update({f"{kind} {c}": why for c, why in res.dropped.items()})
    row[f"{kind}_best"], row[f"{kind}_us"] = res.best.name, res.seconds[res.best.name] * 1e6
    y = run(res.best)
    row[f"{kind}_max_abs_err"] = float((y.float() - ref).abs().max())
    row[f"{kind}_mismatch"] = T.mismatch(y, ref)


# the FastEngine's fused-block launch of each shape (qvlq.int4.fuse_block)
BLOCK_VARIANTS = {"attn.c_attn": dict(norm=4096), "attn.c_proj": dict(resid=1), "mlp.c_proj": dict(resid=1),
                  FUSED[0]: dict(glu=1, norm=4096)}  # fmt: skip


def ranked(row: dict[str, Any]) -> list[M.Config]:
    """The mma configs this row timed, fastest first, as many as the engine's variant tuner tries
    (`int4_mma.ranked_configs`)."""
    timed = {k.removeprefix("mma "): v for k, v in row.get("configs_us", {}).items() if k.startswith("mma ")}
    return M.fastest_first(timed)[: M.VARIANT_CANDIDATES]


def tune_variants(row: dict[str, Any], key: str, mp: M.Packed, flags: dict[str, int], args: argparse.Namespace) -> None:
    """The shape's fused launches with `flags`, as the engine tunes them (`int4_mma.tune_variant` over the
    fastest plain configs): us per call of each block that agrees with its plain config (`{key}_us`), the
    dropped ones and why (`{key}_dropped`), the fastest (`{key}_best`)."""
    try:
        res = M.tune_variant(mp, None, flags, ranked(row), args.calls, args.repeats)
    except RuntimeError as e:
        row[f"{key}_dropped"] = {"all": T.error_line(e)}
        return
    row[f"{key}_us"] = {n: 1e6 * sec for n, sec in res.seconds.items()}
    row[f"{key}_dropped"], row[f"{key}_best"] = res.dropped, res.best.name


def time_block_variant(row: dict[str, Any], mp: M.Packed, args: argparse.Namespace) -> None:
    """The fused-block launches of this shape (`block_variant_us`, ..., see tune_variants)."""
    tune_variants(row, "block_variant", mp, BLOCK_VARIANTS[row["name"]], args)


def time_glu(row: dict[str, Any], mp: M.Packed, x: torch.Tensor, args: argparse.Namespace) -> None:
    """The fused shape's glu blocks (`glu_us`, ..., see tune_variants) and torch's gate alone, compiled as the
    FastEngine's step compiles it (one kernel), us per call."""
    tune_variants(row, "glu", mp, {"glu": 1}, args)
    half = torch.randn(2, x.shape[0], mp.out_features // 2, device=x.device).to(x.dtype)
    gate = torch.compile(M.swiglu, fullgraph=True)
    gate(half[0], half[1])
    row["gate_torch_us"] = 1e6 * T.time_graph(lambda i: gate(half[0], half[1]), args.calls, args.repeats)


def bench_shape(name: str, k: int, n: int, args: argparse.Namespace, copy_bw: float | None) -> dict[str, Any]:
    cuda = not args.dry_run
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, args.dtype)
    codes, zeros, scales = random_layer(k, n, device, seed=hash(name) % 1000)
    p = T.pack(codes, zeros, scales, GROUP)
    x = torch.randn(args.m, k, device=device).to(dtype)
    w32 = T.dequantize(p)
    ref = x.float() @ w32
    # the packing and reference math against the plain formula W[k, n] = s * (q - z)
    naive = (codes.T.float() - zeros.float().repeat_interleave(GROUP, 0)) * scales.repeat_interleave(GROUP, 0)
    row: dict[str, Any] = {"name": name, "in_features": k, "out_features": n, "rows": args.m, "dtype": args.dtype}
    row["pack_exact"] = bool(torch.equal(w32, naive))
    row["reference_mismatch"] = T.mismatch(T.reference(x, p), ref)  # the output dtype's rounding only
    row["triton_bytes"] = p.nbytes()
    if cuda:
        tiny = _pack_torch_int4("int4_cuda", codes, zeros, scales, GROUP)
        tw, tsz = tiny["packed"], tiny[f"sz_{torch.bfloat16}"]
        row["tinygemm_bytes"] = tw.numel() * tw.element_size() + tsz.numel() * tsz.element_size()
        y = _tinygemm(x, tw, tsz, tiny["group"])
        row["tinygemm_max_abs_err"] = float((y.float() - ref).abs().max())
        row["tinygemm_us"] = 1e6 * time_tinygemm(x, tiny, args.calls, args.repeats)
        row["configs_us"], row["dropped"] = {}, {}
        if T.triton_error() is None:
            record(row, "triton", lambda: T.tune(p, args.m, dtype, calls=args.calls, repeats=args.repeats),
                   lambda cfg: T.gemv(x, p, None, cfg), ref)  # fmt: skip
        if M.runtime_error() is None and args.m == 1:
            mp = M.pack(codes, zeros, scales, GROUP, dtype)
            row["mma_bytes"] = mp.nbytes()
            record(row, "mma", lambda: M.tune(mp, calls=args.calls, repeats=args.repeats),
                   lambda cfg: M.gemv(x, mp, None, cfg), ref)  # fmt: skip
            if name == FUSED[0]:
                time_glu(row, mp, x, args)
            if name in BLOCK_VARIANTS and "mma_best" in row:
                time_block_variant(row, mp, args)
        for kind in KINDS:
            if f"{kind}_us" in row:
                gbps = row[f"{kind}_bytes"] / (row[f"{kind}_us"] * 1e-6) / 1e9
                row[f"{kind}_GBps"] = gbps
                row[f"{kind}_pct_copy"] = 100 * gbps * 1e9 / copy_bw if copy_bw else None
    elif T.triton_error() is None:  # TRITON_INTERPRET=1: every config, correctness only
        row["configs_us"], row["dropped"] = {}, {}
        for cfg in T.CONFIGS:
            bad = T.mismatch(T.launch(x, p, None, cfg), ref)
            if bad:
                row["dropped"][cfg.name] = bad
            else:
                row["configs_us"][cfg.name] = None
        row["triton_mismatch"] = next(iter(row["dropped"].values()), None)
    if not cuda:  # the mma kernel's lane-by-lane model
        mp = M.pack(codes, zeros, scales, GROUP, dtype)
        row["mma_mismatch"] = T.mismatch(M.emulate(x, mp), ref)
    return row


def show(console: Console, rows: list[dict[str, Any]], copy_bw: float | None) -> None:
    table = Table(title=f"int4 GEMV, M={rows[0]['rows']}, {rows[0]['dtype']}, group {GROUP}")
    table.add_column("layer")
    table.add_column("K -> N", justify="right")
    for kind in KINDS:
        for col in (f"{kind} us", "GB/s", "% copy"):
            table.add_column(col, justify="right")
    table.add_column("best configs (triton / mma)")
    table.add_column("max err (tiny / triton / mma)", justify="right")

    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    for r in rows:
        cells = [r["name"], f"{r['in_features']} -> {r['out_features']}"]
        for kind in KINDS:
            cells += [f(r.get(f"{kind}_{c}"), sp) for c, sp in (("us", ".2f"), ("GBps", ".0f"), ("pct_copy", ".0f"))]
        cells.append(f"{r.get('triton_best', '-')} / {r.get('mma_best', '-')}")
        cells.append(" / ".join(f(r.get(f"{k}_max_abs_err"), ".1e") for k in ("tinygemm", "triton", "mma")))
        table.add_row(*cells)
    console.print(table)
    configs = sorted(
        {c for r in rows for c in r.get("configs_us", {})} | {c for r in rows for c in r.get("dropped", {})}
    )
    if configs:
        ct = Table(title="Kernel configs, us per call (x = dropped)")
        ct.add_column("config")
        for r in rows:
            ct.add_column(r["name"], justify="right")
        for c in configs:
            cells = []
            for r in rows:
                if c in r.get("dropped", {}):
                    cells.append("x")
                else:
                    v = r.get("configs_us", {}).get(c)
                    cells.append("ok" if v is None and c in r.get("configs_us", {}) else f(v, ".2f"))
            ct.add_row(c, *cells)
        console.print(ct)
    for r in rows:
        for c, why in r.get("dropped", {}).items():
            console.print(f"[yellow]{r['name']}: dropped {c}: {why}")
    if copy_bw:
        console.print(f"device-to-device copy bandwidth: {copy_bw / 1e9:.0f} GB/s")


def step_summary(rows: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(int4 matmul ms of one decode step per kernel: every layer shape once per block; per kernel, mlp.w1 +
    mlp.w2 against the fused shape and what fusing would save a step), over the kernels timed on every row."""
    by_name = {r["name"]: r for r in rows}
    layers = [by_name[name] for name, _, _ in FULL_SHAPES]
    step = {k: BLOCKS * sum(r[f"{k}_us"] for r in layers) / 1e3 for k in KINDS if all(f"{k}_us" in r for r in layers)}
    fusion = {}
    for k in KINDS:
        parts = [by_name[n].get(f"{k}_us") for n in ("mlp.w1", "mlp.w2", FUSED[0]) if n in by_name]
        if len(parts) == 3 and None not in parts:
            saved = BLOCKS * (parts[0] + parts[1] - parts[2]) / 1e3
            fusion[k] = {"w1_plus_w2_us": parts[0] + parts[1], "fused_us": parts[2], "step_saving_ms": saved}
    glu = by_name.get(FUSED[0], {}).get("glu_us")
    if "mma" in fusion and glu:  # the gate in the kernel, against the fused GEMV and torch's gate kernel
        best = min(glu, key=glu.__getitem__)
        gate = by_name[FUSED[0]]["gate_torch_us"]
        saved = BLOCKS * (fusion["mma"]["fused_us"] + gate - glu[best]) / 1e3
        fusion["mma"].update(glu_best=best, glu_us=glu[best], gate_torch_us=gate, glu_step_saving_ms=saved)
    return step, fusion


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--dry-run", action="store_true", help="CPU: small shapes, reference (+ interpreter) checks")
    ap.add_argument("--m", type=int, default=1, help="rows of x (1 = batch-1 decode)")
    ap.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    ap.add_argument("--calls", type=int, default=200, help="calls per CUDA graph")
    ap.add_argument("--repeats", type=int, default=5, help="graph replays; the median is reported")
    args = ap.parse_args(argv)
    console = Console(width=max(160, Console().width))  # logs: keep table rows on one line
    t0 = time.perf_counter()
    if not args.dry_run and not torch.cuda.is_available():
        console.print("[red]no CUDA device (use --dry-run on a CPU machine)")
        return 1
    if not args.dry_run and T.triton_error() and M.runtime_error():
        console.print(f"[red]neither of qvlq's kernels can run: {T.triton_error()}; {M.runtime_error()}")
        return 1
    shapes = DRY_SHAPES if args.dry_run else [*FULL_SHAPES, FUSED]
    copy_bw = None if args.dry_run else measure_bandwidth(torch.device("cuda"), 1 << 30) * 1e9  # bytes/s
    rows = []
    for name, k, n in shapes:
        rows.append(bench_shape(name, k, n, args, copy_bw))
        console.print(f"{name}: done at {time.perf_counter() - t0:.1f} s")
    show(console, rows, copy_bw)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if not args.dry_run else "cpu (dry run)",
        "torch": torch.__version__,
        "triton": None if T.triton_error() else __import__("triton").__version__,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "mma_runtime": M.runtime_error() or "ok",
        "copy_GBps": copy_bw / 1e9 if copy_bw else None,
        "calls_per_graph": args.calls,
        "repeats": args.repeats,
        "shapes": rows,
    }
    if not args.dry_run:
        step, fusion = step_summary(rows)
        result["decode_step_int4_ms"], result["gate_up_fusion"] = step, fusion
        console.print(
            f"int4 matmuls per decode step ({BLOCKS} blocks x {len(FULL_SHAPES)}): "
            + ", ".join(f"{k} {ms:.3f} ms ({step['tinygemm'] / ms:.2f}x tinygemm)" for k, ms in step.items())
        )
        console.print("w1 + w2 vs one fused GEMV: " + ", ".join(
            f"{k} {v['w1_plus_w2_us']:.2f} vs {v['fused_us']:.2f} us ({v['step_saving_ms']:.3f} ms a step)"
            for k, v in fusion.items()
        ))  # fmt: skip
        for r in rows:
            if r.get("block_variant_us"):
                best = r["block_variant_best"]
                console.print(f"{r['name']}: fused-block launch {best} {r['block_variant_us'][best]:.2f} us vs "
                              f"{r['mma_us']:.2f} us plain ({len(r['block_variant_us'])} blocks timed)")  # fmt: skip
        if "glu_us" in fusion.get("mma", {}):
            f = fusion["mma"]
            console.print(
                f"gate in the mma kernel: {f['glu_best']} {f['glu_us']:.2f} us vs fused {f['fused_us']:.2f} + "
                f"torch's gate {f['gate_torch_us']:.2f} us ({f['glu_step_saving_ms']:.3f} ms a step)"
            )
    result["seconds"] = time.perf_counter() - t0
    if args.out:
        write_json(args.out, result)
        console.print(f"wrote {args.out}")
    failures = [
        r["name"]
        for r in rows
        if not r["pack_exact"] or r["reference_mismatch"] or r.get("triton_mismatch") or r.get("mma_mismatch")
    ]
    if failures:
        console.print(f"[red]wrong results: {sorted(set(failures))}")
        return 1
    console.print(f"[green]all checks passed in {result['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
