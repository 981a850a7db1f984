"""Where a decode step's time goes: the FastEngine step of the full-size model, kernel by kernel.

Builds the random-weight model on the device (as `qvlq profile --random-weights` does), compiles the
FastEngine step (torch.compile reduce-overhead on CUDA: fused kernels replayed as CUDA graphs), then
records `--steps` decode steps with the torch profiler and sums the device time per kernel. The gap
between the wall time per step and the kernel time per step is what the GPU spends idle between
kernels. BF16 first, then the Int4 variant made from it in place (RTN g128, the official layout).

    python benchmarks/decode_kernels.py --out decode-kernels.json          # CUDA, full size
    python benchmarks/decode_kernels.py --size tiny --device cpu --context 300   # a check of the script
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qvlq.fast import FUSE_LEVELS, FastEngine, fuse_options  # noqa: E402
from qvlq.int4 import int4_backends, kernel_selection  # noqa: E402
from qvlq.int4_mma import variant_selection  # noqa: E402
from qvlq.io import write_json  # noqa: E402
from qvlq.random_model import build_random_model, quantize_model_rtn  # noqa: E402

CATEGORIES = [  # first match wins; names as CUDA/CPU profilers report them
    ("int4 matmul", r"int4|tinygemm|_weight_int4pack"),
    ("attention", r"flash|fmha|attention|efficient|sdpa|softmax"),
    ("dense matmul", r"gemv|gemm|cutlass|xmma|sm90|ampere|cublas|addmm|\bmm\b|matmul|linear"),
    ("fused (inductor)", r"^triton_"),
    ("copy / fill", r"copy|fill|memset|memcpy|index_copy|cat"),
]


def category(name: str) -> str:
    low = name.lower()
    for label, pattern in CATEGORIES:
        if re.search(pattern, low):
            return label
    return "other"


def profile_steps(engine: FastEngine, vocab: int, prompt: int, warmup: int, steps: int) -> dict:
    device = engine.device
    on_cuda = device.type == "cuda"
    ids = torch.randint(0, vocab, (1, prompt), generator=torch.Generator().manual_seed(0))
    tok = engine.prefill(ids).argmax(-1)
    t0 = time.perf_counter()
    for _ in range(warmup):  # the first step compiles and captures
        tok = engine.step(tok).argmax(-1)
    if on_cuda:
        torch.cuda.synchronize(device)
    warm_s = time.perf_counter() - t0

    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            tok = engine.step(tok).argmax(-1)
        if on_cuda:
            torch.cuda.synchronize(device)
        profiled_wall = time.perf_counter() - t0
    # wall time without the profiler's overhead
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = engine.step(tok).argmax(-1)
    if on_cuda:
        torch.cuda.synchronize(device)
    wall = (time.perf_counter() - t0) / steps

    rows: dict[str, dict] = {}
    for ev in prof.key_averages():
        t = ev.self_device_time_total if on_cuda else ev.self_cpu_time_total
        # on CUDA only kernels count: not ops, runtime calls or the "## Call CompiledFxGraph ##" range
        # (a CPU-side annotation that the profiler gives the device time of everything inside it)
        skip = ("aten::", "cuda", "Torch-Compiled", "CompiledFunction", "## ")
        if t <= 0 or (on_cuda and ev.key.startswith(skip)):
            continue
        r = rows.setdefault(ev.key, {"name": ev.key, "calls": 0, "us": 0.0})
        r["calls"] += ev.count
        r["us"] += t
    kernels = sorted(rows.values(), key=lambda r: -r["us"])
    kernel_us = sum(r["us"] for r in kernels) / steps
    by_cat: dict[str, dict] = {}
    for r in kernels:
        c = by_cat.setdefault(category(r["name"]), {"calls_per_step": 0.0, "us_per_step": 0.0})
        c["calls_per_step"] += r["calls"] / steps
        c["us_per_step"] += r["us"] / steps
    return {
        "wall_ms_per_step": wall * 1e3,
        "profiled_wall_ms_per_step": profiled_wall / steps * 1e3,
        "kernel_ms_per_step": kernel_us / 1e3,
        "kernels_per_step": sum(r["calls"] for r in kernels) / steps,
        "warmup_s": warm_s,
        "by_category": dict(sorted(by_cat.items(), key=lambda kv: -kv[1]["us_per_step"])),
        "top": [{"name": r["name"][:160], "category": category(r["name"]), "calls_per_step": r["calls"] / steps,
                 "us_per_step": r["us"] / steps} for r in kernels[:30]],  # fmt: skip
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="full", help="full or tiny geometry (random weights)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precisions", default="bf16,int4")
    ap.add_argument("--context", type=int, default=2048, help="static cache length (the profile's 2048 cell)")
    ap.add_argument("--prompt", type=int, default=None,
                    help="prompt tokens before the profiled steps (default: context // 2, the mean position of a run "
                    "that fills the cache: what a length-aware attention reads on average)")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--compile", default="auto", help="FastEngine compile: auto, off or a torch.compile mode")
    ap.add_argument("--attention", default="fastest", help="FastEngine decode attention (sdpa, triton, fastest)")
    ap.add_argument("--fuse", choices=FUSE_LEVELS, default="block", help="FastEngine int4 fusion (profile --fuse)")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = ap.parse_args()
    console = Console(width=200)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        console.print("error: CUDA is not available (use --device cpu --size tiny to check the script)")
        return 2
    precisions = [p for p in args.precisions.split(",") if p]
    if precisions not in (["bf16"], ["int4"], ["bf16", "int4"]):
        console.print("error: --precisions takes bf16, int4 or bf16,int4")
        return 2
    compile_opt = {"off": False, "on": True}.get(args.compile, args.compile)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_random_model(args.size, device, dtype=dtype)
    result: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "size": args.size,
        "context": args.context,
        "steps": args.steps,
        "compile": args.compile,
        "fuse": args.fuse,
        "precisions": {},
    }
    for prec in precisions:
        if prec == "int4":
            result["int4_backends"] = quantize_model_rtn(model, dtype=dtype)
        engine = FastEngine(
            model, args.context, compile=compile_opt, attention=args.attention, **fuse_options(args.fuse)
        )
        prompt = args.context // 2 if args.prompt is None else args.prompt
        r = profile_steps(engine, model.config.vocab_size, prompt, args.warmup, args.steps)
        r["prompt"] = prompt
        r["int4_backends"] = int4_backends(model)
        desc = engine.describe()
        r["attention"] = {k: desc[k] for k in ("attention", "attention_choice")}
        r["fusion"] = {k: desc[k] for k in ("fused_mlp", "fused_mlp_gate", "fused_blocks", "fused_block_off")}
        if prec == "int4":  # the tuners' choices: configs (with or without PDL) of the plain and the fused launches
            r["int4_selection"], r["int4_fused"] = kernel_selection(), variant_selection()
        result["precisions"][prec] = r
        del engine
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()

        t = Table(title=f"{prec}: {r['wall_ms_per_step']:.3f} ms/step wall, {r['kernel_ms_per_step']:.3f} ms in "
                  f"{r['kernels_per_step']:.0f} kernels ({result['device']}, context {args.context})")  # fmt: skip
        t.add_column("category")
        t.add_column("kernels/step", justify="right")
        t.add_column("us/step", justify="right")
        t.add_column("% of wall", justify="right")
        for name, c in r["by_category"].items():
            t.add_row(name, f"{c['calls_per_step']:.0f}", f"{c['us_per_step']:.0f}",
                      f"{c['us_per_step'] / 10 / r['wall_ms_per_step']:.1f}")  # fmt: skip
        console.print(t)
        top = Table(title=f"{prec}: top kernels")
        for col in ("kernel", "category", "calls/step", "us/step"):
            top.add_column(col, overflow="fold")
        for k in r["top"][:15]:
            top.add_row(k["name"][:110], k["category"], f"{k['calls_per_step']:.1f}", f"{k['us_per_step']:.1f}")
        console.print(top)
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
