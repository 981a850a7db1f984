"""A `ProfileReport` (qvlq.profile) as tables, markdown, SVG, PNG plots and JSON: what `qvlq profile`
prints and writes under reports/.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .measure import LatencyStats
from .profile import CrossCheck, Environment, MemoryCell, ModelInfo, ProfileReport, SpeedCell
from .report import TableSpec, markdown_tables, md_escape, save_tables_svg


def fmt(x: float | None, nd: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:,.{nd}f}"


def gb(x: int | None) -> str:
    return "n/a" if x is None else f"{x / 1e9:.2f}"


def _speed(report: ProfileReport, prec: str, eng: str, ctx: int) -> SpeedCell | None:
    return next((c for c in report.speed if (c.precision, c.engine, c.context) == (prec, eng, ctx)), None)


def _mem(report: ProfileReport, prec: str, eng: str, cell: str) -> MemoryCell | None:
    return next((m for m in report.memory if (m.precision, m.engine, m.cell) == (prec, eng, cell)), None)


def weights_kv_ratio(report: ProfileReport, m: MemoryCell) -> float | None:
    """Peak allocated / (device-resident weights + KV cache): the profile issue's "within 5%" figure. The KV
    cache is the fast engine's static cache as allocated, else (hf) the cell's context at 16-bit K and V."""
    info = next((x for x in report.models if x.precision == m.precision), None)
    if m.allocated_bytes is None or info is None:
        return None
    kv = report.engines.get(f"{m.precision}/{m.engine}@{m.context}", {}).get("kv_cache_bytes")
    return m.allocated_bytes / (info.resident_bytes + (kv or info.kv_bytes_per_token * m.context))


@dataclass
class Int4Ratio:
    """An Int4 model against the float baseline in the same engine and context: what a user deciding whether
    Int4 is worth it reads first (the profile issue's "Int4/BF16 >= 2.5x"; the seed's was 1.31x)."""

    int4: str
    baseline: str
    engine: str
    context: int
    decode_speedup: float | None  # int4 decode tok/s / baseline's
    e2e_speedup: float | None
    encode_memory: float | None  # int4 peak allocated / baseline's (GPU; None on CPU, where only RSS is known)
    generate_memory: float | None
    complete: bool  # both speed cells ran every planned token and run ("ok")


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def int4_ratios(report: ProfileReport) -> list[Int4Ratio]:
    """Each int* model against the first float model, per engine and context both were run in."""
    precs = [m.precision for m in report.models]
    base = next((p for p in precs if not p.startswith("int")), None)
    out = []
    for q in (p for p in precs if p.startswith("int")) if base else ():
        for c in report.speed:
            if c.precision != q or (b := _speed(report, base, c.engine, c.context)) is None:
                continue
            enc, gen = (_ratio(_alloc(report, q, c.engine, f"{k} {c.context}"),
                               _alloc(report, base, c.engine, f"{k} {c.context}")) for k in ("encode", "generate"))
            out.append(Int4Ratio(q, base, c.engine, c.context, _ratio(c.decode_tok_s, b.decode_tok_s),
                                 _ratio(c.e2e_tok_s, b.e2e_tok_s), enc, gen, c.status == b.status == "ok"))  # fmt: skip
    return out


def _alloc(report: ProfileReport, prec: str, eng: str, cell: str) -> int | None:
    m = _mem(report, prec, eng, cell)
    return m.allocated_bytes if m else None


def _seed_ratio_rows(seed: dict[str, dict[str, float]]) -> list[list[str]]:
    if not {"int4", "bf16"} <= seed.keys():
        return []
    q, b = seed["int4"], seed["bf16"]

    def x(key: str) -> str:
        return _x(_ratio(q[key], b[key]))

    return [["int4 / bf16 (seed)", "A100 HF", "2048", x("tok_s@2048"), "-", x("peak_gb@encode 2048"), "-"],
            ["int4 / bf16 (seed)", "A100 HF", "8192", x("tok_s@8192"), "-", "-", x("peak_gb@generate 8192")]]


def _x(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}x"


def _speed_text(c: SpeedCell | None) -> str:
    if c is None:
        return "-"
    if c.decode_tok_s is None:
        return c.status
    mark = "~" if c.mode == "windowed" else ""
    flag = "" if c.status == "ok" else " *"
    return f"{mark}{c.decode_tok_s:.1f} / {mark}{c.e2e_tok_s:.1f}{flag}"


def _mem_text(m: MemoryCell | None) -> str:
    if m is None:
        return "-"
    if m.allocated_bytes is None and m.host_rss_bytes is None:
        return m.status
    if m.allocated_bytes is None:  # CPU: host RSS is the only figure
        return f"RSS {gb(m.host_rss_bytes)}"
    return f"{gb(m.allocated_bytes)} / {gb(m.nvml_process_bytes)}"


def report_tables(report: ProfileReport) -> list[TableSpec]:
    s = report.settings
    ctxs: list[int] = s["contexts"]
    cmin, cmax = min(ctxs), max(ctxs)
    rows_pe = list(dict.fromkeys((c.precision, c.engine) for c in report.speed))
    on_gpu = report.environment.device.startswith("cuda")
    mem_unit = "alloc / NVML proc GB" if on_gpu else "host RSS GB"

    main = TableSpec(
        f"Qwen-VL-Chat speed and memory ({report.environment.device_name})",
        ["precision", "engine"] + [f"tok/s @{c} (decode / e2e)" for c in ctxs]
        + [f"peak encode {cmin} ({mem_unit})", f"peak generate {cmax} ({mem_unit})"],
        [],
        "~ = windowed estimate; * = see status in the detail table. Seed rows: the README's A100 figures.",
    )
    for prec, eng in rows_pe:
        main.rows.append([prec, eng] + [_speed_text(_speed(report, prec, eng, c)) for c in ctxs]
                         + [_mem_text(_mem(report, prec, eng, f"encode {cmin}")),
                            _mem_text(_mem(report, prec, eng, f"generate {cmax}"))])  # fmt: skip
    if {2048, 8192} <= set(ctxs):
        for prec, ref in report.seed_reference.items():
            main.rows.append([f"{prec} (seed)", "A100 HF"] + [
                f"{ref[f'tok_s@{c}']:.2f}" if f"tok_s@{c}" in ref else "-" for c in ctxs
            ] + [f"{ref['peak_gb@encode 2048']:.2f}" if cmin == 2048 else "-",
                 f"{ref['peak_gb@generate 8192']:.2f}" if cmax == 8192 else "-"])  # fmt: skip
    tables = [main]
    if not {2048, 8192} <= set(ctxs):
        tables.append(TableSpec(
            "Seed reference (Qwen-VL README, A100-SXM4-80G, HF)",
            ["precision", "tok/s @2048", "tok/s @8192", "peak GB encode 2048", "peak GB generate 8192"],
            [[p, *(f"{r[k]:.2f}" for k in ("tok_s@2048", "tok_s@8192", "peak_gb@encode 2048",
                                            "peak_gb@generate 8192"))] for p, r in report.seed_reference.items()],
        ))  # fmt: skip

    ratios = int4_ratios(report)
    if ratios:
        tables.append(TableSpec(
            "Int4 against the float model (same engine and context)",
            ["models", "engine", "ctx", "decode speedup", "e2e speedup", "peak alloc encode", "peak alloc generate"],
            [[f"{r.int4} / {r.baseline}", r.engine, str(r.context), _x(r.decode_speedup) + ("" if r.complete else " *"),
              _x(r.e2e_speedup), _x(r.encode_memory), _x(r.generate_memory)] for r in ratios]
            + _seed_ratio_rows(report.seed_reference),
            "* = a speed cell did not run in full (see status in the detail table). Memory: torch peak allocated "
            "(GPU only). Seed rows: the README's A100 figures.",
        ))  # fmt: skip

    detail = TableSpec(
        "Speed detail",
        ["precision", "engine", "ctx", "mode", "runs", "prompt", "new", "TTFT ms", "prefill tok/s", "decode tok/s",
         "+-sd", "e2e tok/s", "p50 ms", "p90 ms", "p99 ms", "sd ms", "bound tok/s", "% bound", "eff GB/s", "status"],
        [],
    )  # fmt: skip
    for c in report.speed:
        lat = c.latency
        detail.rows.append([
            c.precision, c.engine, str(c.context), c.mode, f"{c.runs}/{c.runs_planned}", str(c.prompt_tokens),
            str(c.new_tokens), fmt(c.ttft_ms, 0), fmt(c.prefill_tok_s, 0), fmt(c.decode_tok_s, 2),
            fmt(c.decode_tok_s_stdev, 2), fmt(c.e2e_tok_s, 2), fmt(lat and lat.p50_ms, 2), fmt(lat and lat.p90_ms, 2),
            fmt(lat and lat.p99_ms, 2), fmt(lat and lat.stdev_ms, 2), fmt(c.bound_tok_s, 0), fmt(c.pct_of_bound, 1),
            fmt(c.effective_gbs, 0 if (c.effective_gbs or 0) >= 100 else 2),
            c.status + (f" ({c.note})" if c.note else ""),
        ])  # fmt: skip
    tables.append(detail)

    mem = TableSpec(
        "Peak memory (GB = 1e9 bytes)",
        ["precision", "engine", "cell", "torch alloc", "alloc / (weights + KV)", "torch reserved", "NVML process",
         "NVML device", "host RSS", "s", "status"],
        [[m.precision, m.engine, m.cell, gb(m.allocated_bytes), fmt(weights_kv_ratio(report, m), 3),
          gb(m.reserved_bytes), gb(m.nvml_process_bytes),
          gb(m.nvml_device_bytes), gb(m.host_rss_bytes), fmt(m.seconds, 1), m.status + (f" ({m.note})" if m.note
          else "")] for m in report.memory],
    )  # fmt: skip
    tables.append(mem)

    models = TableSpec(
        "Models",
        ["precision", "source", "dtype", "params (float)", "weights GB", "resident GB", "bits/w linears",
         "bits/w overall", "read GB/token", "KV KiB/token", "int4 kernels", "build s"],
        [[m.precision, m.source + (" (RANDOM)" if m.random_weights else ""), m.dtype, f"{m.float_params:,}",
          f"{gb(m.weight_bytes)} {m.weight_bytes_kind}",
          gb(m.resident_bytes) + (f" (+{gb(m.host_bytes)} host)" if m.host_bytes else ""),
          f"{m.bits_per_weight_linears:.3f}",
          f"{m.bits_per_weight_overall:.3f}", f"{m.read_bytes_per_token / 1e9:.3f}",
          f"{m.kv_bytes_per_token / 1024:.1f}", ", ".join(f"{k} x{v}" for k, v in m.int4_backends.items()) or "-",
          fmt(m.build_seconds, 1)] for m in report.models],
    )  # fmt: skip
    tables.append(models)

    if report.crosschecks:
        tables.append(TableSpec(
            "Greedy cross-check (first tokens of both engines, same weights and prompt)",
            ["precision", "ctx", "engines", "agree", "first divergence", "note"],
            [[x.precision, str(x.context), " vs ".join(x.engines), f"{x.agree}/{x.compared}",
              "-" if x.first_divergence is None else str(x.first_divergence), x.note] for x in report.crosschecks],
        ))  # fmt: skip
    if report.engines:
        tables.append(TableSpec(
            "Engines (describe())", ["cell", "description"],
            [[k, ", ".join(f"{a}={b}" for a, b in v.items())] for k, v in report.engines.items()],
        ))  # fmt: skip
    e = report.environment
    env_rows = [
        ["device", f"{e.device} ({e.device_name}, cc {e.compute_capability or '-'}, {gb(e.device_memory_bytes)} GB)"],
        ["driver / CUDA", f"{e.driver or 'n/a'} / {e.cuda or 'n/a'}"],
        ["torch / transformers / qvlq", f"{e.torch} / {e.transformers} / {e.qvlq}"],
        ["python", e.python], ["CPU", f"{e.cpu} ({e.cpu_threads} threads, torch uses {e.torch_threads})"],
        ["NVML", e.nvml],
        ["bandwidth", f"{report.bandwidth_gbs:.0f} GB/s measured (device copy)"
         + (f"; nominal peak {report.nominal_peak_gbs:.0f} GB/s" if report.nominal_peak_gbs else "")],
        ["int4 kernels", ("; ".join(f"{m.precision}: {m.int4_backends}" for m in report.models if m.int4_backends)
                          + f" (requested: {s.get('int4_kernel', 'auto')})")
         if any(m.int4_backends for m in report.models) else "-"],
        *([["int4 kernel choice", "; ".join(_selection_text(c) for m in report.models for c in m.int4_selection)]]
          if any(m.int4_selection for m in report.models) else []),
        *([["int4 fused launches", "; ".join(_fused_text(c) for m in report.models for c in m.int4_fused)]]
          if any(m.int4_fused for m in report.models) else []),
        ["fast engine compile", s.get("fast_compile", "auto") + (f", kv_block {s['kv_block']}" if s.get("kv_block")
                                                                 else "")],
        ["fast engine attention", f"requested {s.get('attention', 'sdpa')}; " + (_attention_text(report) or "-")],
        ["weights", "RANDOM (" + str(s["random_weights"]) + " geometry)" if s.get("random_weights") else "checkpoint"],
        ["started / wall time", f"{report.started} / {report.seconds:.0f} s"],
    ]  # fmt: skip
    tables.append(TableSpec("Environment", ["", ""], env_rows))
    return tables


def _attention_text(report: ProfileReport) -> str:
    """The fast engines' attention, cells with the same one named together."""
    cells: dict[str, list[str]] = {}
    for k, v in report.engines.items():
        if v.get("engine") == "fast":
            cells.setdefault(str(v.get("attention")), []).append(k)
    return "; ".join(f"{', '.join(ks)}: {a}" for a, ks in cells.items())


def _selection_text(c: dict[str, Any]) -> str:
    """One measured int4 kernel choice: shape, timings at one row (or why a kernel could not be timed), the
    winner."""
    parts = []
    for kernel in ("int4_cuda", "triton", "mma"):
        if f"{kernel}_us" in c:
            cfg = f" [{c[f'{kernel}_config']}]" if f"{kernel}_config" in c else ""
            parts.append(f"{kernel} {c[f'{kernel}_us']:.1f} us{cfg}")
        elif f"{kernel}_error" in c:
            parts.append(f"{kernel} failed ({c[f'{kernel}_error'][:80]})")
    return f"{c['in_features']}->{c['out_features']}: {', '.join(parts)} -> {c['choice']}"


def _fused_text(c: dict[str, Any]) -> str:
    """One tuned fused launch (qvlq.int4_mma.variant_selection): shape, blocks timed, the winner."""
    timed = ", ".join(f"{n} {us:.1f}" for n, us in sorted(c["configs_us"].items(), key=lambda kv: kv[1]))
    return f"{c['in_features']}->{c['out_features']} {c['variant']}: {timed} us -> {c['choice']}"


def render_markdown(report: ProfileReport, tables: list[TableSpec], figures: Sequence[str] = ()) -> str:
    lines = [f"# qvlq profile: {report.environment.device_name}", ""]
    lines += [f"- {md_escape(n)}" for n in report.notes] + [""]
    lines += markdown_tables(tables)
    for f in figures:
        lines += [f"![{f}]({f})", ""]
    return "\n".join(lines)


def plot_speed(report: ProfileReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctxs = report.settings["contexts"]
    fig, axes = plt.subplots(1, len(ctxs), figsize=(6 * len(ctxs), 4.2), squeeze=False)
    for ax, ctx in zip(axes[0], ctxs, strict=True):
        for c in (c for c in report.speed if c.context == ctx and c.series_latency_ms):
            lat = np.asarray(c.series_latency_ms)
            label = f"{c.precision}/{c.engine}" + (" (windows)" if c.mode == "windowed" else "")
            if c.mode == "windowed":
                ax.plot(c.series_position, 1e3 / lat, "o--", label=label)
            else:
                k = max(1, len(lat) // 50)  # light smoothing of the (already bucketed) series
                smooth = np.convolve(lat, np.ones(k) / k, mode="valid")
                ax.plot(c.series_position[k - 1 :], 1e3 / smooth, label=label)
        ax.set_title(f"context {ctx}: decode speed along the generation")
        ax.set_xlabel("generated token")
        ax.set_ylabel("tok/s (1 / per-token latency)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report.environment.device_name}" + (" - RANDOM weights" if report.settings.get("random_weights")
                                                       else ""))  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory(report: ProfileReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [m for m in report.memory if any(v is not None for v in (m.allocated_bytes, m.host_rss_bytes))]
    series = [("torch alloc", "allocated_bytes"), ("torch reserved", "reserved_bytes"),
              ("NVML process", "nvml_process_bytes"), ("NVML device", "nvml_device_bytes"),
              ("host RSS", "host_rss_bytes")]  # fmt: skip
    series = [(n, a) for n, a in series if any(getattr(m, a) is not None for m in cells)]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(cells) + 2), 4.5))
    x = np.arange(len(cells))
    w = 0.8 / max(len(series), 1)
    for i, (name, attr) in enumerate(series):
        vals = [(getattr(m, attr) or 0) / 1e9 for m in cells]
        ax.bar(x + (i - (len(series) - 1) / 2) * w, vals, w, label=name)
    ax.set_xticks(x, [f"{m.precision}/{m.engine}\n{m.cell}" for m in cells], fontsize=7)
    ax.set_ylabel("peak GB (1e9 bytes)")
    ax.set_title(f"Peak memory - {report.environment.device_name}")
    ax.grid(axis="y", alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_json(report: ProfileReport) -> dict[str, Any]:
    d = asdict(report)
    d["int4_ratios"] = [asdict(r) for r in int4_ratios(report)]  # derived, for readers of the JSON
    return json.loads(json.dumps(d, default=str))


def load_report(path: str | os.PathLike) -> ProfileReport:
    """A report.json written by `write_report`, back as a ProfileReport (to render it again)."""
    try:
        d = json.loads(Path(path).read_text())
        return ProfileReport(
            **{k: d[k] for k in ("settings", "bandwidth_gbs", "nominal_peak_gbs", "engines", "notes", "started")},
            seconds=d["seconds"],
            environment=Environment(**d["environment"]),
            models=[ModelInfo(**_renamed(m, streamed_bytes="host_bytes")) for m in d["models"]],
            speed=[SpeedCell(**{**c, "latency": c["latency"] and LatencyStats(**c["latency"])}) for c in d["speed"]],
            memory=[MemoryCell(**m) for m in d["memory"]],
            crosschecks=[CrossCheck(**c) for c in d["crosschecks"]],
            seed_reference=d.get("seed_reference") or {},
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a qvlq profile report.json ({type(e).__name__}: {e})") from None


def _renamed(d: dict[str, Any], **names: str) -> dict[str, Any]:
    """d with keys of earlier report versions under their current names (old=new)."""
    return {names.get(k, k): v for k, v in d.items()}


def default_out_dir(device: str | torch.device | None = None) -> Path:
    """reports/profile/<device-slug>-<date>/ for the device a profile runs on."""
    from .model.loading import resolve_device

    d = resolve_device(device)
    name = torch.cuda.get_device_name(d) if d.type == "cuda" and torch.cuda.is_available() else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return Path("reports") / "profile" / f"{slug}-{datetime.now():%Y-%m-%d}"


def check_out_dir(out: str | os.PathLike | None, device: str | None, overwrite: bool) -> Path:
    """The report directory, refused before any work if it exists and overwrite is off."""
    from .io import OutputExistsError

    path = Path(out) if out is not None else default_out_dir(device)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists (pass --overwrite to replace it)")
    return path


def write_report(report: ProfileReport, out: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """report.json, report.md, report.svg, speed.png and memory.png, written atomically into `out`."""
    from .io import atomic_dir, atomic_write_text

    out = Path(out) if out is not None else default_out_dir(report.settings.get("device"))
    tables = report_tables(report)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        atomic_write_text(tmp / "report.json", json.dumps(report_json(report), indent=2) + "\n")
        plot_speed(report, tmp / "speed.png")
        plot_memory(report, tmp / "memory.png")
        atomic_write_text(tmp / "report.md", render_markdown(report, tables, ["speed.png", "memory.png"]))
        save_tables_svg(tmp / "report.svg", tables, report.notes, title="qvlq profile")
    return out
