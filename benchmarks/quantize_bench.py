"""Quantize benchmarks: synthetic multimodal calibration data, machine facts, and the full-size driver.

    python3 benchmarks/quantize_bench.py full [--dry-run]     # what benchmarks/quantize_full.sh runs
    python3 benchmarks/quantize_bench.py check SRC INT4 BUNDLE  # load + logits + chat sanity (a step of `full`)

`full` runs every heavy step as its own process (the real `qvlq` commands where one exists), records
wall times with timestamps, polls the quantize process's RSS, the GPU's memory (NVML) and its block
checkpoints (so a run cut short still says how far it got), and writes quantize-full.json / .md
after every step. The driver itself touches torch only on the CPU (mini-suite pictures for the data)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
T0 = time.perf_counter()

# Long-text filler for calibration rows: plain words the tokenizer maps to ~1 token each.
FILLER = (
    "the a of and to in is it that this on with as for was are be at by from or an which one two three "
    "picture image shape colour color red orange yellow green blue purple circle square triangle cross "
    "left right top bottom middle center corner above below next near far small large bright dark light "
    "word text letter read write answer question model vision language scene object box there here "
    "cat dog sun cup hat key map pen bus fox owl tree fish bird lamp door boat moon frog cake kite bell lion"
).split()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def write_calibration_data(out_dir: Path, n_rows: int, seq_len: int, images_per_row: int, seed: int = 0) -> Path:
    """A Qwen-VL finetune JSON of `n_rows` conversations: `images_per_row` picture turns from the mini
    task suite (question + short answer each), then one long text turn, so every row is longer than
    `seq_len` tokens and truncation (at `seq_len`) cuts inside text, never a picture."""
    from qvlq.mini.tasks import generate_suite, write_finetune_json

    samples = generate_suite(n_rows * images_per_row, seed=seed, split="calib")
    write_finetune_json(samples, out_dir, "single-turn")  # writes images/<id>.png
    rng = random.Random(seed)
    rows = []
    for r in range(n_rows):
        turns = []
        for k, s in enumerate(samples[r * images_per_row : (r + 1) * images_per_row], 1):
            turns.append({"from": "user", "value": f"Picture {k}: <img>images/{s.id}.png</img>\n{s.question}"})
            turns.append({"from": "assistant", "value": s.answer})
        text = " ".join(rng.choice(FILLER) for _ in range(seq_len))
        turns.append({"from": "user", "value": "Describe everything above in detail."})
        turns.append({"from": "assistant", "value": text})
        rows.append({"id": f"row{r:04d}", "conversations": turns})
    path = out_dir / "calib.json"
    path.write_text(json.dumps(rows, indent=0))
    return path


def machine_info() -> dict:
    """Host, versions and (if present) GPU, without importing torch in this process."""
    info: dict = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        model = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
        info["cpu"] = model
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    try:
        info["mem_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except (OSError, ValueError, AttributeError):
        pass
    probe = (
        "import json, platform, torch, transformers, safetensors\n"
        "d = {'torch': torch.__version__, 'transformers': transformers.__version__,"
        " 'safetensors': safetensors.__version__, 'torch_threads': torch.get_num_threads()}\n"
        "if torch.cuda.is_available():\n"
        "    p = torch.cuda.get_device_properties(0)\n"
        "    d.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)\n"
        "print(json.dumps(d))\n"
    )
    try:
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=180, check=True)
        info.update(json.loads(out.stdout.strip().splitlines()[-1]))
    except (subprocess.SubprocessError, ValueError, IndexError) as e:
        info["probe_error"] = str(e)[:200]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "qvlq"], cwd=REPO, capture_output=True, text=True)
        if rev.returncode == 0:
            info["git"] = rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        pass
    return info


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def _dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) if d.exists() else 0


# ------------------------------------------------------------------------------------------------ full run


class Report:
    def __init__(self, out_dir: Path, name: str, config: dict) -> None:
        self.out_dir, self.name = out_dir, name
        out_dir.mkdir(parents=True, exist_ok=True)
        self.data: dict = {"benchmark": name, "config": config, "steps": {}, "status": "running"}

    def step(self, key: str, **values) -> None:
        self.data["steps"].setdefault(key, {}).update(values)
        self.save()

    def save(self) -> None:
        (self.out_dir / f"{self.name}.json").write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        (self.out_dir / f"{self.name}.md").write_text(self.markdown())

    def markdown(self) -> str:
        d, c = self.data, self.data["config"]
        m = d.get("machine", {})
        lines = [
            f"# qvlq quantize benchmark: {d['benchmark']} ({d['status']})",
            "",
            f"- model: `{c['size']}` Qwen-VL-Chat geometry, random bf16 weights (seed 0), "
            f"generated on {c['init_device']}",
            f"- calibration: {c['n_samples']} samples x {c['seq_len']} tokens, {c['images_per_sample']} mini-suite "
            "pictures + long text each",
            f"- quantize: `{c['quantize_cmd']}`",
            f"- machine: {m.get('gpu', 'no GPU')}; {m.get('cpu', '?')} x{m.get('cpus', '?')}; torch {m.get('torch')}, "
            f"transformers {m.get('transformers')}, python {m.get('python')}, qvlq {m.get('git', '?')}",
            "",
            "| step | wall s | notes |",
            "| --- | ---: | --- |",
        ]
        for key, s in d["steps"].items():
            notes = ", ".join(f"{k} {v}" for k, v in s.items() if k != "seconds" and not isinstance(v, (dict, list)))
            secs = "-" if s.get("seconds") is None else f"{s['seconds']:.1f}"
            lines.append(f"| {key} | {secs} | {notes} |")
        q = d["steps"].get("quantize", {})
        if q.get("block_seconds"):
            lines += ["", f"Per-block wall times (s, from the block checkpoints): {q['block_seconds']}"]
        lines.append("")
        return "\n".join(lines)


def _run_step(report: Report, key: str, cmd: list[str], deadline: float, watch_blocks: Path | None = None,
              stdout_path: Path | None = None) -> subprocess.CompletedProcess | None:  # fmt: skip
    """Run cmd; poll its RSS (with children), the GPU's used memory and block checkpoints until it ends or
    the deadline passes (then SIGTERM, SIGKILL)."""
    import psutil

    nvml = None
    try:
        import pynvml

        pynvml.nvmlInit()
        nvml = pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:  # no GPU / no NVML
        pass
    log(f"{key}: {' '.join(cmd)}")
    t = time.perf_counter()
    out_f = open(stdout_path, "w") if stdout_path else None  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=out_f or None)
    ps = psutil.Process(proc.pid)
    peak_rss, peak_gpu, blocks, timed_out = 0, 0, {}, False
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak_rss = max(peak_rss, rss)
        except psutil.Error:
            pass
        if nvml is not None:
            try:
                peak_gpu = max(peak_gpu, pynvml.nvmlDeviceGetMemoryInfo(nvml).used)
            except Exception:
                pass
        if watch_blocks is not None and watch_blocks.is_dir():
            for f in watch_blocks.glob("block_*.safetensors"):
                if f.name not in blocks:
                    blocks[f.name] = round(time.perf_counter() - t, 1)
                    log(f"{key}: {f.stem} done at +{blocks[f.name]:.1f}s")
        if time.perf_counter() > deadline:
            log(f"{key}: over the time budget, stopping it")
            timed_out = True
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
            break
        time.sleep(0.5)
    proc.wait()
    if out_f:
        out_f.close()
    secs = time.perf_counter() - t
    values = {"seconds": round(secs, 1), "rc": proc.returncode, "peak_rss_polled": _gib(peak_rss)}
    if nvml is not None:
        values["peak_gpu_used_nvml"] = _gib(peak_gpu)
    if blocks:
        times = sorted(blocks.values())
        values["blocks_done"] = len(times)
        values["block_seconds"] = [round(b - a, 1) for a, b in zip([0.0] + times[:-1], times, strict=True)]
    if timed_out:
        values["timed_out"] = True
    report.step(key, **values)
    log(f"{key}: rc {proc.returncode} in {secs:.1f}s")
    return None if proc.returncode else subprocess.CompletedProcess(cmd, 0)


def full(args: argparse.Namespace) -> int:
    dry = args.dry_run
    size = "tiny" if dry else "full"
    n, seq = (args.n_samples or (4 if dry else 128)), (args.seq_len or (1024 if dry else 2048))
    ipr = args.images or (2 if dry else 4)
    device = "cpu" if dry else "cuda"
    init_device = args.init_device or device
    work = Path(args.work)
    report_dir = Path(os.environ["OUT"]) / "quantize-full" if os.environ.get("OUT") else REPO / "reports" / "quantize"
    src, data_dir, bundle, qout = work / "src", work / "data", work / "bundle", work / "int4"
    py = sys.executable
    qcmd = [py, "-m", "qvlq.cli", "quantize", str(src), "--calib", str(bundle), "--out", str(qout),
            "--device", device, "--overwrite", "--json"]  # fmt: skip
    config = {"size": size, "n_samples": n, "seq_len": seq, "images_per_sample": ipr, "device": device,
              "init_device": init_device, "budget_s": args.budget, "work": str(work),
              "quantize_cmd": " ".join(["qvlq", *qcmd[3:]])}  # fmt: skip
    report = Report(report_dir, "quantize-full" if not dry else "quantize-full-dryrun", config)
    deadline = T0 + args.budget
    log(f"plan: {size} model, {n} x {seq} tokens ({ipr} pictures each) on {device}; budget {args.budget}s; "
        f"report -> {report_dir}")  # fmt: skip
    log(
        "estimates on an H100 (s): machine probe ~15, init ~60-90 (19.3 GB written), data + calibrate ~40, "
        "quantize ~250-350, check ~60 (skipped if under 90 s are left)"
    )

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    free = shutil.disk_usage(work).free
    log(f"free disk at {work}: {free / 2**30:.1f} GiB (needs ~40 GiB for full)")
    if not dry and free < 38 * 2**30:  # 19.3 source + 1.3 bundle + 5.5 block checkpoints + 9.7 output + slack
        report.step("disk", free_gib=round(free / 2**30, 1), needed_gib=38)
        return _finish(report, "failed: not enough disk space at WORK")
    report.data["machine"] = machine_info()
    report.data["machine"]["disk_free_gib"] = round(free / 2**30, 1)
    report.save()
    log(f"machine: {report.data['machine']}")

    # 1. the float checkpoint
    init = (f"from qvlq.checkpoint import init_checkpoint as i; "
            f"print(i({str(src)!r}, {size!r}, seed=0, dtype='bf16', device={init_device!r}))")  # fmt: skip
    if _run_step(report, "init_checkpoint", [py, "-c", init], deadline) is None:
        return _finish(report, "failed: init_checkpoint")
    gb = _dir_bytes(src) / 1e9
    report.step("init_checkpoint", gigabytes=round(gb, 2),
                gb_per_s=round(gb / max(report.data["steps"]["init_checkpoint"]["seconds"], 1e-6), 2))  # fmt: skip

    # 2. calibration data (mini-suite pictures + long text) and the bundle (`qvlq calibrate`)
    t = time.perf_counter()
    data = write_calibration_data(data_dir, n, seq, ipr)
    report.step("calibration_data", seconds=round(time.perf_counter() - t, 1), rows=n, pictures=n * ipr)
    ccmd = [py, "-m", "qvlq.cli", "calibrate", str(data), "--model", str(src), "--out", str(bundle),
            "--num-samples", str(n), "--max-len", str(seq), "--json"]  # fmt: skip
    if _run_step(report, "calibrate", ccmd, deadline, stdout_path=work / "calibrate.json") is None:
        return _finish(report, "failed: calibrate")
    stats = json.loads((work / "calibrate.json").read_text())["stats"]
    keep = ("samples", "total_tokens", "min_tokens", "max_tokens", "images", "image_token_share")
    report.step("calibrate", **{k: stats[k] for k in keep}, bundle=_gib(_dir_bytes(bundle)))

    # 3. quantize
    res = _run_step(report, "quantize", qcmd, deadline, watch_blocks=work / ".int4.qvlq-work",
                    stdout_path=work / "quantize.json")  # fmt: skip
    if res is None:
        return _finish(report, "failed or cut short: quantize")
    r = json.loads((work / "quantize.json").read_text())
    mods = r["modules"]
    ratio = sorted(m["rtn_loss"] / m["gptq_loss"] for m in mods if m["gptq_loss"] > 0)
    report.step(
        "quantize", result_seconds=round(r["seconds"], 1), peak_device_allocated=_gib(r.get("peak_device_bytes")),
        peak_rss=_gib(r.get("peak_rss_bytes")), compute_dtype=r["compute_dtype"], modules=len(mods),
        gptq_better_than_rtn=f"{sum(m['gptq_loss'] < m['rtn_loss'] for m in mods)}/{len(mods)}",
        rtn_over_gptq_median=round(ratio[len(ratio) // 2], 2) if ratio else None,
        gptq_seconds_total=round(sum(m["seconds"] for m in mods), 1), output=_gib(_dir_bytes(qout)),
    )  # fmt: skip
    (report.out_dir / "quantize-result.json").write_text(json.dumps(r, indent=1) + "\n")

    # 4. sanity: the native loader reads the output; logits vs the float model; greedy chat
    left = deadline - time.perf_counter()
    if left < (90 if not dry else 10):
        report.step("check", skipped=f"only {left:.0f}s of the budget left")
    else:
        kcmd = [py, str(Path(__file__).resolve()), "check", str(src), str(qout), str(bundle), "--device", device,
                "--out", str(work / "check.json")]  # fmt: skip
        if _run_step(report, "check", kcmd, deadline) is not None:
            report.step("check", **json.loads((work / "check.json").read_text()))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return _finish(report, "ok")


def _finish(report: Report, status: str) -> int:
    report.data["status"] = status
    report.data["total_seconds"] = round(time.perf_counter() - T0, 1)
    report.save()
    log(f"{status}; total {report.data['total_seconds']}s; report {report.out_dir / report.name}.json/.md")
    return 0 if status == "ok" else 1


def check(args: argparse.Namespace) -> int:
    """Float vs Int4 logits on calibration sample 0, and a short greedy chat with the Int4 model."""
    import torch

    from qvlq.calibrate import load_bundle
    from qvlq.model.modeling import QWenLMHeadModel
    from qvlq.tokenizer import QWenTokenizer

    dev = torch.device(args.device)
    sample = load_bundle(args.bundle)[0]
    res: dict = {}

    def logits(model) -> torch.Tensor:
        with torch.inference_mode():
            return model(**sample.model_inputs(dev, next(model.parameters()).dtype)).logits.float().cpu()

    t = time.perf_counter()
    fdtype = "bf16" if dev.type == "cuda" else "fp32"
    fm = QWenLMHeadModel.from_pretrained(args.src, device=dev, dtype=fdtype)
    fl = logits(fm)
    del fm
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    res["float_seconds"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    qm = QWenLMHeadModel.from_pretrained(args.int4, device=dev)
    res["int4_load_seconds"] = round(time.perf_counter() - t, 1)
    ql = logits(qm)
    res["int4_dtype"] = str(qm.dtype).removeprefix("torch.")
    res["int4_backends"] = sorted({getattr(m, "backend", "") for m in qm.modules() if hasattr(m, "qweight")})
    res["logits_rel_err"] = round(float((ql - fl).norm() / fl.norm()), 5)
    res["top1_agreement"] = round(float((ql.argmax(-1) == fl.argmax(-1)).float().mean()), 4)
    tok = QWenTokenizer.from_pretrained(str(args.int4))
    t = time.perf_counter()
    reply, _ = qm.chat(tok, "Describe the weather in one sentence.", do_sample=False, max_new_tokens=16)
    res["chat_seconds"] = round(time.perf_counter() - t, 1)
    res["chat_reply_chars"] = len(reply)
    if dev.type == "cuda":
        res["int4_peak_allocated"] = _gib(torch.cuda.max_memory_allocated())
    Path(args.out).write_text(json.dumps(res) + "\n")
    print(json.dumps(res))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("full", help="init -> calibration -> quantize -> check, timed, with a report")
    f.add_argument("--dry-run", action="store_true", help="tiny model on the CPU (checks this script)")
    f.add_argument("--n-samples", type=int, default=None)
    f.add_argument("--seq-len", type=int, default=None)
    f.add_argument("--images", type=int, default=None, help="pictures per calibration sample (4; dry run 2)")
    f.add_argument("--init-device", default=None, help="where init-checkpoint draws the weights (cuda/cpu)")
    f.add_argument("--work", default=os.environ.get("WORK", "/tmp/qvlq-quantize-bench"))
    f.add_argument("--budget", type=float, default=float(os.environ.get("MAX_SECONDS", 540)))
    f.add_argument("--keep", action="store_true", help="keep the work directory (checkpoint, bundle, output)")
    c = sub.add_parser("check")
    c.add_argument("src")
    c.add_argument("int4")
    c.add_argument("bundle")
    c.add_argument("--device", default="cuda")
    c.add_argument("--out", required=True)
    args = ap.parse_args()
    return full(args) if args.cmd == "full" else check(args)


if __name__ == "__main__":
    sys.exit(main())
