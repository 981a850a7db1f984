"""First contact of qvlq's tensor-core int4 kernel (qvlq.int4_mma) with a GPU: does it compile, load, launch,
and take every weight's code, scale and zero from the right place?

For each activation dtype, group size and configuration, `int4_mma.layout_probe` runs the kernel with x = the
identity and packings that spell out positions, so a wrong fragment layout shows up as "row r input i uses the
code of input j (lane/word/nibble -> lane/word/nibble)" instead of a bare mismatch. A few seconds on a GPU.

    python benchmarks/mma_diagnose.py --out mma-diagnose.json

Exit status 1 if any case fails (and 1 without CUDA).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qvlq import int4_mma as M  # noqa: E402
from qvlq.io import write_json  # noqa: E402

CASES = [(dtype, gs) for dtype in (torch.bfloat16, torch.float16) for gs in (128, 64, 256, -1)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="write the findings as JSON here")
    args = ap.parse_args(argv)
    console = Console(width=max(160, Console().width))
    if not torch.cuda.is_available():
        console.print("[red]no CUDA device")
        return 1
    if M.runtime_error():
        console.print(f"[red]{M.runtime_error()}")
        return 1
    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []
    for dtype, gs in CASES:
        for cfg in M.CONFIGS:
            name = f"{str(dtype).removeprefix('torch.')} g{gs} {cfg.name}"
            try:
                findings = M.layout_probe(lambda x, p, c=cfg: M.gemv(x, p, None, c), 32, 512, gs, dtype, "cuda")
            except Exception as e:  # compile, load or launch failure: the message is the finding
                torch.cuda.synchronize()
                findings = [f"{type(e).__name__}: {e}"]
            results.append({"case": name, "ok": not findings, "findings": findings})
            console.print(f"{'[green]ok' if not findings else '[red]FAIL'}[/] {name}")
            for line in findings:
                console.print(f"    {line}")
    major, minor = torch.cuda.get_device_capability()
    out = {
        "device": torch.cuda.get_device_name(), "capability": f"{major}.{minor}", "torch": torch.__version__,
        "nvrtc": str(M._nvrtc()._name), "seconds": time.perf_counter() - t0, "cases": results,
    }  # fmt: skip
    if args.out:
        write_json(args.out, out)
    failed = [r["case"] for r in results if not r["ok"]]
    console.print(f"{len(results) - len(failed)} of {len(results)} cases ok in {out['seconds']:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
