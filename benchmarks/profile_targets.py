"""The profile issue's targets, checked against profile reports: each target, the figure measured, met or not.
gpu_checks.sh runs it over the reports its steps bring back. The targets are benchmarks, not tests, and they
are set for an H100: a report from another device is checked all the same, with its device named.

    python benchmarks/profile_targets.py OUT/profile-full/report.json [OUT/profile-host-embedding/report.json]
        [--out targets.md] [--json]

Targets (the issue's): the fast engine's Int4 decode >= 60% of the bandwidth bound at 258 -> 2048; its BF16
>= 75%; Int4/BF16 >= 2.5x at 2048 and >= 2.1x at 8192; Int4 peak memory within 5% of weights + KV cache
(torch's peak allocated over the device-resident weights and the static cache), encode-2048 <= 10.5 GB and
generate-8192 <= 14.8 GB. A report made with --host-embedding or --stream-vision is labelled so, since its
memory cells leave the host weights out. Targets no report measured are listed as not measured.
What keeping weights in host memory costs is listed after the targets: each such report's decode tok/s and
time to first token against the same cell of a report without those flags.

Exit status 0 whether or not the targets are met; 2 when a report cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from qvlq.io import atomic_write_text
from qvlq.profile import ProfileReport
from qvlq.profile_report import int4_ratios, load_report, weights_kv_ratio
from qvlq.report import TableSpec, markdown_tables, render_rich


@dataclass
class Check:
    target: str
    want: str
    got: str  # the figure as shown ("63.2%"), or "not measured"
    met: bool | None  # None: not measured
    source: str  # which report (and mode) gave the figure


PCT_BOUND = {("int4", 2048): 60.0, ("bf16", None): 75.0}  # (precision, context or any) -> minimum % of bound
SPEEDUP = ((2048, 2.5), (8192, 2.1))
MEMORY_GB = (("encode 2048", 10.5), ("generate 8192", 14.8))
WITHIN = 1.05


def host_flags(report: ProfileReport) -> list[str]:
    """The flags that kept weights in host memory for this report (its memory cells leave them out)."""
    return [flag for flag, key in (("--host-embedding", "host_embedding"), ("--stream-vision", "stream_vision"))
            if report.settings.get(key)]  # fmt: skip


def label(path: Path, report: ProfileReport) -> str:
    modes = host_flags(report)
    return f"{path.parent.name}" + (f" ({' '.join(modes)})" if modes else "")


def checks_of(path: Path, report: ProfileReport) -> list[Check]:
    src = label(path, report)
    out = []
    for c in report.speed:
        if c.engine != "fast" or c.pct_of_bound is None:
            continue
        want = PCT_BOUND.get((c.precision, c.context), PCT_BOUND.get((c.precision, None)))
        if want is not None:
            partial = "" if c.status == "ok" else f" ({c.status.split(':')[0]})"
            out.append(Check(f"fast {c.precision} % of bound @{c.context}", f">= {want:.0f}%",
                             f"{c.pct_of_bound:.1f}%{partial}", c.pct_of_bound >= want, src))  # fmt: skip
    for r in int4_ratios(report):
        want = dict(SPEEDUP).get(r.context)
        if r.engine == "fast" and want is not None and r.decode_speedup is not None:
            partial = "" if r.complete else " (a cell ran partly)"
            out.append(Check(f"fast {r.int4}/{r.baseline} decode @{r.context}", f">= {want}x",
                             f"{r.decode_speedup:.2f}x{partial}", r.decode_speedup >= want, src))  # fmt: skip
    for m in report.memory:
        limit = dict(MEMORY_GB).get(m.cell)
        if m.engine != "fast" or not m.precision.startswith("int") or limit is None or m.allocated_bytes is None:
            continue
        ratio = weights_kv_ratio(report, m)
        if ratio is not None:
            out.append(Check(f"{m.precision} {m.cell}: peak / (weights + KV)", f"<= {WITHIN:.2f}", f"{ratio:.3f}",
                             ratio <= WITHIN, src))  # fmt: skip
        gb = m.allocated_bytes / 1e9
        out.append(Check(f"{m.precision} {m.cell}: peak allocated", f"<= {limit} GB", f"{gb:.2f} GB", gb <= limit, src))
    return out


def host_costs(reports: list[tuple[Path, ProfileReport]]) -> list[Check]:
    """Each fast cell of a report with weights in host memory against the same cell of a report without."""
    resident = {(c.precision, c.context): c for _, r in reports if not host_flags(r) for c in r.speed
                if c.engine == "fast" and c.decode_tok_s}  # fmt: skip
    out = []
    for path, r in reports:
        for c in (c for c in r.speed if host_flags(r) and c.engine == "fast" and c.decode_tok_s):
            base = resident.get((c.precision, c.context))
            if base is not None:
                ttft = f", TTFT {c.ttft_ms / base.ttft_ms:.2f}x" if c.ttft_ms and base.ttft_ms else ""
                out.append(Check(f"cost: {c.precision} fast @{c.context} against resident weights", "",
                                 f"decode {c.decode_tok_s / base.decode_tok_s:.3f}x{ttft}", None, label(path, r)))
    return out


def all_checks(paths: list[Path]) -> tuple[list[Check], list[str]]:
    """The checks of every report, then one "not measured" row per target none of them measured, then what the
    host-memory modes cost (host_costs); and the devices the reports ran on."""
    checks: list[Check] = []
    devices = []
    reports = [(p, load_report(p)) for p in paths]
    for p, report in reports:
        devices.append(f"{label(p, report)}: {report.environment.device_name}")
        checks += checks_of(p, report)
    targets = ([f"fast {p} % of bound @{c or 2048}" for p, c in PCT_BOUND]
               + [f"fast int4/bf16 decode @{c}" for c, _ in SPEEDUP]
               + [f"int4 {cell}: peak allocated" for cell, _ in MEMORY_GB])  # fmt: skip
    seen = {c.target for c in checks}
    checks += [Check(t, "", "not measured", None, "-") for t in targets if t not in seen]
    return checks + host_costs(reports), devices


def table(checks: list[Check], devices: list[str]) -> TableSpec:
    return TableSpec(
        "The profile issue's targets (set for an H100)",
        ["target", "wanted", "measured", "met", "report"],
        [[c.target, c.want, c.got, {True: "yes", False: "NO", None: "-"}[c.met], c.source] for c in checks],
        "Devices: " + "; ".join(devices),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="+", type=Path, help="report.json files of qvlq profile")
    ap.add_argument("--out", type=Path, help="write the table here as markdown")
    ap.add_argument("--json", action="store_true", help="print the checks as JSON")
    args = ap.parse_args(argv)
    try:
        checks, devices = all_checks(args.reports)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    spec = table(checks, devices)
    if args.out:
        atomic_write_text(args.out, "\n".join(markdown_tables([spec])) + "\n")
    if args.json:
        print(json.dumps({"devices": devices, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        from rich.console import Console

        Console(width=200).print(*render_rich([spec]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
