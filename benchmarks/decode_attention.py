"""Decode attention of one layer at full size (32 heads x 128, batch 1): what the FastEngine's step reads
and how fast, for each way it can attend.

  sdpa        F.scaled_dot_product_attention over the whole static cache with the 0/-inf mask (the "sdpa"
              step: its read does not depend on the position)
  sdpa-b512   the same over the first multiple of 512 slots (FastEngine kv_block=512: one graph per bucket)
  triton      qvlq.decode_attention, the config tune() picks for this cache (slots 0..pos only), and every
              other config at the tuning position. Its time also covers what the SDPA rows leave to other
              kernels: RoPE of q and k, the logN scale and the cache write.

Per cache length (max_seq_len of the seed's 2048 and 8192 runs: 2079 and 8223 slots) and position: us per
call (a CUDA graph of --calls calls over --layers caches, so K/V come from HBM, median of 5 replays), the
bytes the position needs (K and V of slots 0..pos) over that time, and the step estimate x 32 layers. Each
kernel result is checked against the fp32 reference first.

    python benchmarks/decode_attention.py --out decode-attention.json     # CUDA, ~30-60 s on an H100/H200

Exit status 1 on a wrong result or without CUDA/triton.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qvlq import decode_attention as A  # noqa: E402
from qvlq.int4_triton import mismatch, time_graph, triton_error  # noqa: E402
from qvlq.io import write_json  # noqa: E402
from qvlq.measure import measure_bandwidth  # noqa: E402
from qvlq.model.modeling import rope_cos_sin  # noqa: E402

HEADS, HEAD_DIM, LAYERS_PER_STEP = 32, 128, 32
LENGTHS = (2079, 8223)  # FastEngine max_seq_len of the protocol's runs: 289-token prompt + 1790 / 7934 new


def bench_length(length: int, args: argparse.Namespace) -> dict[str, Any]:
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    gen = torch.Generator(device=dev).manual_seed(0)
    qkv = torch.randn(1, 3, HEADS, HEAD_DIM, device=dev, generator=gen).to(dtype)
    q = qkv[:, 0]
    cos, sin = rope_cos_sin(torch.arange(length, device=dev), HEAD_DIM, 10000.0, 1.0)
    logn = torch.tensor([1.0], dtype=dtype, device=dev)
    caches = [
        tuple(torch.randn(1, HEADS, length, HEAD_DIM, device=dev, generator=gen).to(dtype) for _ in range(2))
        for _ in range(args.layers)
    ]
    tuned = A.tuned(1, HEADS, HEAD_DIM, length, dtype, dev)
    positions = sorted({288, length // 4, length // 2, 3 * length // 4, length - 1})
    rows = []
    for pos in positions:
        p = torch.tensor([pos], device=dev)
        n = pos + 1
        need = 2 * HEADS * n * HEAD_DIM * q.element_size()
        row: dict[str, Any] = {"position": pos, "bytes_needed": need}
        ref = A.reference(qkv, *(t.clone() for t in caches[0]), cos, sin, p, logn, torch.float32)
        got = A.launch(qkv, *(t.clone() for t in caches[0]), cos, sin, p, logn, tuned.best)
        row["triton_mismatch"] = mismatch(got, ref)
        for name, bucket in (("sdpa", length), ("sdpa-b512", min(length, -(-n // 512) * 512))):
            bias = torch.zeros(1, 1, 1, bucket, dtype=dtype, device=dev)
            bias[..., n:] = float("-inf")

            def sdpa(i: int, bias: torch.Tensor = bias, bucket: int = bucket) -> torch.Tensor:
                k, v = caches[i % args.layers]
                return F.scaled_dot_product_attention(q[:, :, None], k[:, :, :bucket], v[:, :, :bucket], attn_mask=bias)

            row[f"{name}_us"] = time_graph(sdpa, args.calls, 5) * 1e6

        def triton(i: int, p: torch.Tensor = p) -> torch.Tensor:
            return A.launch(qkv, *caches[i % args.layers], cos, sin, p, logn, tuned.best)

        row["triton_us"] = time_graph(triton, args.calls, 5) * 1e6
        for name in ("sdpa", "sdpa-b512", "triton"):
            row[f"{name}_GBps_needed"] = need / row[f"{name}_us"] / 1e3
        rows.append(row)
    mean = {k: sum(r[f"{k}_us"] for r in rows) / len(rows) for k in ("sdpa", "sdpa-b512", "triton")}
    return {
        "length": length,
        "triton_config": tuned.best.name,
        "tune_position": tuned.length,
        "tune_us": {k: v * 1e6 for k, v in tuned.seconds.items()},
        "tune_sdpa_us": tuned.sdpa_s * 1e6,
        "tune_dropped": tuned.dropped,
        "positions": rows,
        # the positions are spread evenly over the cache: their mean ~ a run that fills it from the start
        "step_ms_mean_over_positions": {k: v * LAYERS_PER_STEP / 1e3 for k, v in mean.items()},
    }


def show(console: Console, result: dict[str, Any]) -> None:
    for r in result["lengths"]:
        t = Table(title=f"decode attention, cache {r['length']} slots, triton {r['triton_config']} "
                  f"(us per layer; GB/s of the bytes slots 0..pos need)")  # fmt: skip
        for c in ("position", "sdpa us", "sdpa-b512 us", "triton us", "sdpa GB/s", "b512 GB/s", "triton GB/s", "ok"):
            t.add_column(c, justify="right")
        for p in r["positions"]:
            t.add_row(
                str(p["position"]), f"{p['sdpa_us']:.1f}", f"{p['sdpa-b512_us']:.1f}", f"{p['triton_us']:.1f}",
                f"{p['sdpa_GBps_needed']:.0f}", f"{p['sdpa-b512_GBps_needed']:.0f}", f"{p['triton_GBps_needed']:.0f}",
                "yes" if p["triton_mismatch"] is None else p["triton_mismatch"],
            )  # fmt: skip
        console.print(t)
        console.print(
            f"x {LAYERS_PER_STEP} layers, mean over positions: "
            + ", ".join(f"{k} {v:.3f} ms" for k, v in r["step_ms_mean_over_positions"].items())
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="cache lengths (slots), comma-separated")
    ap.add_argument("--layers", type=int, default=8, help="caches rotated inside the graph (past L2)")
    ap.add_argument("--calls", type=int, default=64, help="calls per CUDA graph")
    ap.add_argument("--device", default="cuda:0", help=argparse.SUPPRESS)  # tests patch the CUDA timing away
    args = ap.parse_args(argv)
    console = Console(width=max(160, Console().width))
    on_cuda = args.device.startswith("cuda")
    if (on_cuda and not torch.cuda.is_available()) or triton_error():
        console.print(f"[red]needs CUDA and triton ({triton_error() or 'no CUDA device'})")
        return 1
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(args.device) if on_cuda else args.device,
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "dtype": args.dtype,
        "copy_GBps": measure_bandwidth(torch.device(args.device), 1 << 30) if on_cuda else None,
        "lengths": [],
    }
    for length in (int(x) for x in args.lengths.split(",")):
        try:
            result["lengths"].append(bench_length(length, args))
        except RuntimeError as e:  # tune(): no config passed its check
            console.print(f"[red]length {length}: {e}")
            return 1
        console.print(f"length {length}: done at {time.perf_counter() - t0:.1f} s")
    result["seconds"] = time.perf_counter() - t0
    show(console, result)
    if args.out:
        write_json(args.out, result)
        console.print(f"wrote {args.out}")
    wrong = [(r["length"], p["position"]) for r in result["lengths"] for p in r["positions"] if p["triton_mismatch"]]
    if wrong:
        console.print(f"[red]wrong results at (length, position) {wrong}")
        return 1
    console.print(f"[green]all checks passed in {result['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
