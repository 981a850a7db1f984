"""Per-module GPTQ on CPU: qvlq's core (qvlq.gptq) against GPTQModel's, same weights, same calibration.

    PYTHONPATH=. <python with gptqmodel 7.6> benchmarks/gptq_vs_gptqmodel.py [--threads 2] [--tokens 4096]

Needs the optional `interop` extra (GPTQModel 7.6 beside the CPU torch; see tests/test_interop.py for
the separate environment it needs). Writes reports/quantize/gptq-vs-gptqmodel-cpu.{json,md}.

Two sets of modules:
- ``mini``: every quantized linear of the shipped qvlq-mini, calibrated on real multimodal activations
  (mini-suite ``calib`` pictures + questions + answers through the float model; every module sees the
  float model's inputs, so both tools get identical data).
- ``full``: the five Qwen-VL-Chat module shapes (c_attn 4096->12288, attn.c_proj 4096->4096, w1/w2
  4096->11008, mlp.c_proj 11008->4096) with random weights and synthetic activations (per-channel
  scales spread over two decades plus a few outlier channels, like LLM activations); the same X for
  both tools.

Per module and tool: seconds to accumulate the Hessian (the same calibration chunks), seconds to
quantize, and the relative output error ||X W^T - X Q^T||^2 / ||X W^T||^2 on the calibration rows.
GPTQModel runs its classic GPTQ (``act_group_aware=False``) so both solve the same problem; its default
GAR ordering (``act_group_aware=True``) is reported as a quality column. Settings: the official
Qwen-VL-Chat-Int4 ones (4 bit, g128, sym, desc_act false, damp 0.01, block 128).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # 7.6 refuses fewer on a 2-core machine

import torch  # noqa: E402

from qvlq.gptq import GPTQ, QuantSpec, round_to_nearest  # noqa: E402
from qvlq.interop import gptqmodel_quantize  # noqa: E402

FULL_SHAPES = {  # name: (in_features, out_features)
    "attn.c_attn": (4096, 12288),
    "attn.c_proj": (4096, 4096),
    "mlp.w1": (4096, 11008),
    "mlp.w2": (4096, 11008),
    "mlp.c_proj": (11008, 4096),
}
CHUNK = 2048  # calibration rows per add_batch call (one 2048-token sample, as in quantize)


def synthetic_activations(n: int, in_f: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-1, 1, in_f)[torch.randperm(in_f, generator=g)]
    outliers = torch.randperm(in_f, generator=g)[: max(1, in_f // 512)]
    scale[outliers] *= 20.0
    return torch.randn(n, in_f, generator=g) * scale


def mini_activations(n_samples: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (float weight, inputs [rows, in])} for every linear in qvlq-mini's LLM blocks."""
    from qvlq.mini.evaluate import sample_pixels
    from qvlq.mini.tasks import generate_suite
    from qvlq.mini.train import render_sample
    from qvlq.model.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(REPO / "qvlq" / "assets" / "qvlq-mini", device="cpu", dtype="fp32")
    model.eval()
    samples = generate_suite(n_samples, seed=0, split="calib")
    size = int(model.config.visual["image_size"])
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, mod in model.transformer.h.named_modules():
        if isinstance(mod, torch.nn.Linear):
            full = f"transformer.h.{name}"
            inputs[full] = []
            keep = lambda m, a, o, k=full: inputs[k].append(a[0].reshape(-1, a[0].shape[-1]))  # noqa: E731
            hooks.append(mod.register_forward_hook(keep))
    with torch.no_grad():
        for s, px in zip(samples, sample_pixels(samples, size).split(1), strict=True):
            ids = torch.tensor([render_sample(tok, s.question, s.answer)[0]])
            model.transformer(ids, images=px, use_cache=False)  # the picture through the vision tower
    for hk in hooks:
        hk.remove()
    weights = dict(model.named_parameters())
    return {k: (weights[k + ".weight"].detach().clone(), torch.cat(v)) for k, v in inputs.items()}


def rel_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    ref = x @ w.T
    return float(((x @ q.T - ref).norm() / ref.norm()) ** 2)


def run_qvlq(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec) -> dict:
    t0 = time.perf_counter()
    gq = GPTQ(tuple(w.shape))
    for c in x.split(CHUNK):
        gq.add_batch(c)
    t1 = time.perf_counter()
    res = gq.quantize(w.clone(), spec)
    t2 = time.perf_counter()
    return {"hessian_s": t1 - t0, "quantize_s": t2 - t1, "q": res.dequant(), "codes": res.codes}


def run_gptqmodel(w: torch.Tensor, x: torch.Tensor, spec: QuantSpec) -> dict:
    r = gptqmodel_quantize(w, x, spec, CHUNK)
    return {"hessian_s": r.hessian_s, "quantize_s": r.quantize_s, "q": r.weight, "codes": r.codes}


def bench_module(name: str, w: torch.Tensor, x: torch.Tensor, spec: QuantSpec, repeats: int) -> dict:
    ours, theirs = [], []
    for _ in range(repeats):  # alternate, so drift in machine load hits both alike
        ours.append(run_qvlq(w, x, spec))
        theirs.append(run_gptqmodel(w, x, spec))
    gar_spec = dataclasses.replace(spec, act_group_aware=True)
    gar, ours_gar = run_gptqmodel(w, x, gar_spec), run_qvlq(w, x, gar_spec)

    def med(rs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rs)

    row = {
        "module": name, "in": w.shape[1], "out": w.shape[0], "rows": x.shape[0], "repeats": repeats,
        "qvlq": {"hessian_s": med(ours, "hessian_s"), "quantize_s": med(ours, "quantize_s"),
                 "rel_error": rel_error(x, w, ours[0]["q"])},
        "gptqmodel": {"hessian_s": med(theirs, "hessian_s"), "quantize_s": med(theirs, "quantize_s"),
                      "rel_error": rel_error(x, w, theirs[0]["q"])},
        "gptqmodel_gar_rel_error": rel_error(x, w, gar["q"]),
        "qvlq_gar_rel_error": rel_error(x, w, ours_gar["q"]),
        "codes_equal": float((ours[0]["codes"] == theirs[0]["codes"]).float().mean()),
        "rtn_rel_error": rel_error(x, w, round_to_nearest(w, spec).dequant()),
    }  # fmt: skip
    for tool in ("qvlq", "gptqmodel"):
        row[tool]["total_s"] = row[tool]["hessian_s"] + row[tool]["quantize_s"]
    row["speedup"] = row["gptqmodel"]["total_s"] / row["qvlq"]["total_s"]
    return row


def render(result: dict) -> list:
    from qvlq.report import TableSpec

    tables = []
    titles = {"mini": "qvlq-mini, real multimodal activations", "full": "Qwen-VL-Chat shapes, synthetic activations"}
    for part, title in titles.items():
        if not result["modules"][part]:
            continue
        rows = []
        for r in result["modules"][part]:
            o, t = r["qvlq"], r["gptqmodel"]
            rows.append([
                r["module"], f"{r['in']}x{r['out']}", str(r["rows"]),
                f"{o['hessian_s']:.3f} + {o['quantize_s']:.3f}", f"{t['hessian_s']:.3f} + {t['quantize_s']:.3f}",
                f"{r['speedup']:.2f}x", f"{o['rel_error']:.3e}", f"{t['rel_error']:.3e}",
                f"{r['qvlq_gar_rel_error']:.3e}", f"{r['gptqmodel_gar_rel_error']:.3e}", f"{r['rtn_rel_error']:.3e}",
                f"{100 * r['codes_equal']:.1f}%",
            ])  # fmt: skip
        tot_o = sum(r["qvlq"]["total_s"] for r in result["modules"][part])
        tot_t = sum(r["gptqmodel"]["total_s"] for r in result["modules"][part])
        rows.append(["all", "", "", f"{tot_o:.2f}", f"{tot_t:.2f}", f"{tot_t / tot_o:.2f}x", "", "", "", "", "", ""])
        tables.append(TableSpec(
            title=title,
            columns=["module", "in x out", "rows", "qvlq s (H + quant)", "gptqmodel s (H + quant)", "qvlq speed-up",
                     "qvlq err", "gptqmodel err", "qvlq GAR err", "gptqmodel GAR err", "RTN err", "codes equal"],
            rows=rows,
            caption="err = ||XW^T - XQ^T||^2 / ||XW^T||^2 on the calibration rows; seconds are medians of "
                    f"{result['modules'][part][0]['repeats']} runs, Hessian accumulation + quantization (classic "
                    "GPTQ). codes equal: share of identical integer codes, qvlq vs GPTQModel classic; both solve the "
                    "same problem, but qvlq rounds scales to fp16 before coding and sums in another order, and one "
                    "differing code changes the error fed to every later column (more columns, more drift); the "
                    "errors agree.",
        ))  # fmt: skip
    return tables


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--tokens", type=int, default=4096, help="calibration rows per full-size module")
    ap.add_argument("--mini-samples", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per mini module")
    ap.add_argument("--full-repeats", type=int, default=1)
    ap.add_argument("--only", choices=("mini", "full"), default=None)
    ap.add_argument("--out", type=Path, default=REPO / "reports" / "quantize")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)
    import gptqmodel
    from quantize_bench import machine_info
    from rich.console import Console

    from qvlq.io import atomic_write_text
    from qvlq.report import markdown_tables, render_rich

    console = Console()
    spec = QuantSpec()
    result: dict = {"format": "qvlq gptq-vs-gptqmodel v1", "spec": spec.__dict__ | {"true_sequential": True},
                    "gptqmodel": gptqmodel.__version__, "torch_threads": args.threads, "device": "cpu",
                    "machine": machine_info(), "modules": {"mini": [], "full": []}}  # fmt: skip
    t0 = time.perf_counter()
    if args.only in (None, "mini"):
        for name, (w, x) in mini_activations(args.mini_samples).items():
            result["modules"]["mini"].append(bench_module(name, w, x, spec, args.repeats))
            console.log(name, f"{result['modules']['mini'][-1]['speedup']:.2f}x")
    if args.only in (None, "full"):
        for i, (name, (in_f, out_f)) in enumerate(FULL_SHAPES.items()):
            g = torch.Generator().manual_seed(100 + i)
            w = torch.randn(out_f, in_f, generator=g) * 0.02
            x = synthetic_activations(args.tokens, in_f, seed=i)
            result["modules"]["full"].append(bench_module(name, w, x, spec, args.full_repeats))
            console.log(name, f"{result['modules']['full'][-1]['speedup']:.2f}x")
    result["seconds"] = time.perf_counter() - t0
    tables = render(result)
    for t in render_rich(tables):
        console.print(t)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "gptq-vs-gptqmodel-cpu.json", json.dumps(result, indent=1) + "\n")
    head = [
        "# GPTQ per module on CPU: qvlq vs GPTQModel",
        "",
        f"Measured with `benchmarks/gptq_vs_gptqmodel.py` on CPU ({result['machine'].get('cpu')}, "
        f"{args.threads} torch threads), torch {result['machine'].get('torch')}, GPTQModel {gptqmodel.__version__}, "
        f"qvlq {result['machine'].get('git')}. Settings: 4 bit, group 128, sym, desc_act false, damp 0.01, "
        "block 128. GPTQModel runs classic GPTQ (act_group_aware=False) for the timed and error columns; "
        "its default GAR ordering is the extra error column. Full-size modules use random weights and synthetic "
        "activations (timing does not depend on values).",
        "",
    ]
    atomic_write_text(args.out / "gptq-vs-gptqmodel-cpu.md", "\n".join(head + markdown_tables(tables)))


if __name__ == "__main__":
    main()
