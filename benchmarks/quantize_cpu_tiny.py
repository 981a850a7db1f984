"""Time `qvlq quantize` on the tiny checkpoint on the CPU; writes reports/quantize/cpu-tiny.{md,json}.

    python benchmarks/quantize_cpu_tiny.py [--samples 8] [--seq-len 1024] [--images 2] [--repeats 3]

Same synthetic calibration as the full benchmark (mini-suite pictures + long text, see
quantize_bench.write_calibration_data), bf16 random tiny checkpoint (hidden 128, 2 layers, real vocab
and 448-px / 256-query pictures). Each repeat is a fresh in-process quantize into a new directory;
phases come from quantize's events (capture = vision tower + embeddings, per block, write). The load
average before and after is recorded: on a shared box, wall times are only comparable at similar load."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize_bench import REPO, machine_info, write_calibration_data  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--images", type=int, default=2, help="pictures per sample")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "quantize")
    args = ap.parse_args()

    load_before = [round(x, 2) for x in os.getloadavg()]
    t_import = time.perf_counter()
    import torch

    from qvlq.calibrate import build_bundle
    from qvlq.checkpoint import init_checkpoint
    from qvlq.model.loading import read_config
    from qvlq.quantize import quantize
    from qvlq.tokenizer import QWenTokenizer

    import_s = time.perf_counter() - t_import
    work = Path(tempfile.mkdtemp(prefix="qvlq-cpu-tiny-"))
    try:
        t = time.perf_counter()
        init_checkpoint(work / "src", "tiny", seed=0, dtype="bf16")
        init_s = time.perf_counter() - t
        t = time.perf_counter()
        data = write_calibration_data(work / "data", args.samples, args.seq_len, args.images)
        calib = build_bundle(
            data, QWenTokenizer.from_pretrained(str(work / "src")), read_config(work / "src"),
            num_samples=args.samples, max_len=args.seq_len,
        )  # fmt: skip
        calib_s = time.perf_counter() - t
        runs = []
        for r in range(args.repeats):
            marks: dict[str, float] = {}
            t0, c0 = time.perf_counter(), time.process_time()

            def on_event(kind: str, _t0: float = t0, _marks: dict = marks, **e) -> None:
                if kind == "capture" and e["done"] == e["total"]:  # vision tower + embeddings finished
                    _marks["captured"] = time.perf_counter() - _t0
                elif kind in ("block_done", "write"):
                    _marks[f"{kind}_{e['block']}" if kind == "block_done" else kind] = time.perf_counter() - _t0

            res = quantize(work / "src", calib, work / f"out{r}", device="cpu", on_event=on_event)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            blocks = [marks[f"block_done_{i}"] for i in range(res.n_blocks)]
            runs.append({
                "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                "capture_s": round(marks["captured"], 3),
                "block_s": [round(b - a, 3) for a, b in zip([marks["captured"]] + blocks[:-1], blocks, strict=True)],
                "write_s": round(wall - marks["write"], 3),
                "gptq_s": round(sum(m.seconds for m in res.modules), 3),
            })  # fmt: skip
            print(f"run {r}: {runs[-1]}", flush=True)
        mods = res.modules
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        walls = [x["wall_s"] for x in runs]
        report = {
            "benchmark": "quantize cpu tiny",
            "machine": machine_info() | {"loadavg_before": load_before, "loadavg_after": [
                round(x, 2) for x in os.getloadavg()]},
            "config": {"samples": len(calib), "tokens": calib.stats.total_tokens, "images": calib.stats.images,
                       "seq_len": args.seq_len, "torch_threads": torch.get_num_threads(), "spec": res.spec},
            "setup_s": {"imports": round(import_s, 2), "init_checkpoint": round(init_s, 2),
                        "calibration": round(calib_s, 2)},
            "runs": runs,
            "wall_s_min": min(walls), "wall_s_median": statistics.median(walls),
            "peak_rss_bytes": peak_rss,
            "modules": [{"block": m.block, "module": m.module, "gptq_loss": m.gptq_loss, "rtn_loss": m.rtn_loss}
                        for m in mods],
        }  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu-tiny.json").write_text(json.dumps(report, indent=2) + "\n")
    m, c = report["machine"], report["config"]
    lines = [
        "# qvlq quantize, tiny checkpoint on the CPU",
        "",
        f"- machine: {m.get('cpu')} x{m.get('cpus')}, {m.get('mem_gib')} GiB; torch {m.get('torch')} "
        f"({c['torch_threads']} threads), transformers {m.get('transformers')}, python {m.get('python')}, "
        f"qvlq {m.get('git', '?')}",
        f"- load average before / after: {m['loadavg_before']} / {m['loadavg_after']} (shared machine: wall times "
        "scale with it)",
        f"- calibration: {c['samples']} samples, {c['tokens']:,} tokens, {c['images']} pictures (max_len "
        f"{c['seq_len']}); spec {json.dumps(c['spec'])}",
        f"- setup: imports {report['setup_s']['imports']} s, init-checkpoint {report['setup_s']['init_checkpoint']} s,"
        f" calibration {report['setup_s']['calibration']} s; peak RSS {peak_rss / 2**30:.2f} GiB",
        "",
        "| run | wall s | CPU s | setup + capture s | per block s (GPTQ + forwards) | GPTQ s | write s |",
        "| ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for i, r in enumerate(runs):
        per_block = ", ".join(f"{b:.2f}" for b in r["block_s"])
        lines.append(
            f"| {i} | {r['wall_s']:.2f} | {r['cpu_s']:.2f} | {r['capture_s']:.2f} | {per_block} | "
            f"{r['gptq_s']:.2f} | {r['write_s']:.2f} |"
        )
    lines += [
        "",
        f"min {report['wall_s_min']:.2f} s, median {report['wall_s_median']:.2f} s. GPTQ loss below RTN on "
        f"{sum(x['gptq_loss'] < x['rtn_loss'] for x in report['modules'])}/{len(report['modules'])} modules.",
        "",
    ]
    (args.out / "cpu-tiny.md").write_text("\n".join(lines))
    print((args.out / "cpu-tiny.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
