"""`qvlq demo`: the whole pipeline on qvlq-mini (the small trained Qwen-VL shipped with the package),
on a CPU in minutes: calibrate (multimodal) -> quantize (official Int4 settings) -> chat (a grounded
answer, box drawn) -> profile (short contexts) -> compare (task accuracy BF16 vs Int4, plus the same
quantization calibrated text-only and an RTN baseline; judge-free BF16-vs-Int4 metrics) -> a report."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .report import TableSpec, markdown_tables, save_tables_svg

Event = Callable[[str, str], None]  # (step, message)
STEPS = ("calibrate", "quantize", "chat", "profile", "compare", "report")


def default_model_dir() -> Path:
    """qvlq-mini as shipped inside the package (official Qwen-VL-Chat directory layout)."""
    return Path(str(resources.files("qvlq") / "assets" / "qvlq-mini"))


def display_path(path: Path) -> str:
    """The path relative to the working directory when inside it (reports stay machine-independent)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


@dataclass
class DemoOptions:
    model: str | None = None  # default: the shipped qvlq-mini
    out: str = "reports/demo"
    n_calib: int = 64
    n_eval: int = 150
    max_len: int = 512
    seed: int = 0
    profile_contexts: tuple[int, ...] = (128, 256)
    device: str = "cpu"
    work: str | None = None  # intermediate checkpoints (default: a temp dir, removed at the end)


@dataclass
class VariantScore:
    name: str
    description: str
    accuracy: dict[str, dict[str, float]]  # task -> {accuracy, ci_low, ci_high, n}
    size_bytes: int


@dataclass
class DemoResult:
    out: str
    model: str
    seconds: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    quantize_losses: dict[str, dict[str, float]] = field(default_factory=dict)  # variant -> mean losses
    chat: dict[str, Any] = field(default_factory=dict)
    variants: list[VariantScore] = field(default_factory=list)
    profile_summary: list[dict[str, Any]] = field(default_factory=list)
    judge_free: list[dict[str, Any]] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)  # qvlq.profile.Environment: where the numbers came from


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def run_demo(opts: DemoOptions, on_event: Event | None = None) -> DemoResult:
    from .calibrate import build_bundle, load_model_meta
    from .chat import chat, draw_on_latest_picture
    from .compare import CompareSettings, run_compare
    from .compare import write_report as write_compare
    from .gptq import QuantSpec
    from .io import atomic_dir
    from .mini.evaluate import evaluate_tasks, load_model
    from .mini.tasks import Task, generate_suite, write_finetune_json, write_touchstone_tsv
    from .profile import ProfileSettings, run_profile
    from .profile_report import write_report as write_profile
    from .quantize import quantize

    emit = on_event or (lambda step, msg: None)
    model_dir = Path(opts.model) if opts.model else default_model_dir()
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir}: no qvlq-mini checkpoint there (train one with `qvlq train-mini`)")
    out = Path(opts.out)
    work = Path(opts.work) if opts.work else Path(tempfile.mkdtemp(prefix="qvlq-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    import torch

    from .measure import probe_nvml
    from .profile import environment

    dev = torch.device(opts.device)
    res = DemoResult(out=str(out), model=display_path(model_dir), environment=asdict(environment(dev, probe_nvml(dev))))
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        res.seconds[step] = round(now - clock, 2)
        clock = now

    try:
        # 1. calibrate: the calibration split of the task suite, in the Qwen-VL finetune format
        emit("calibrate", f"{opts.n_calib} multimodal conversations from the calibration split")
        tokenizer, config = load_model_meta(model_dir)
        data = write_finetune_json(generate_suite(opts.n_calib, seed=opts.seed, split="calib"), work / "calib", "calib")
        calib_mm = build_bundle(data, tokenizer, config, num_samples=opts.n_calib, max_len=opts.max_len, seed=opts.seed)
        calib_txt = build_bundle(
            data, tokenizer, config, num_samples=opts.n_calib, max_len=opts.max_len, seed=opts.seed, text_only=True
        )
        res.calibration = asdict(calib_mm.stats)
        lap("calibrate")

        # 2. quantize: official Int4 settings; the same text-only; RTN
        variants = {
            "int4-gptq": ("GPTQ 4-bit g128 sym, multimodal calibration (official settings)", calib_mm, "gptq"),
            "int4-gptq-text": ("GPTQ, same settings, text-only calibration", calib_txt, "gptq"),
            "int4-rtn": ("round-to-nearest 4-bit g128 sym (no calibration needed)", calib_mm, "rtn"),
        }
        for name, (_, calib, method) in variants.items():
            emit("quantize", name)
            r = quantize(model_dir, calib, work / name, QuantSpec(), device=opts.device, overwrite=True, method=method)
            res.quantize_losses[name] = {
                "gptq_loss": sum(m.gptq_loss for m in r.modules) / len(r.modules),
                "rtn_loss": sum(m.rtn_loss for m in r.modules) / len(r.modules),
            }
        lap("quantize")

        # 3. chat: one grounded answer from the Int4 model, box drawn on the picture
        emit("chat", "a grounding question to the Int4 model")
        int4, tok4 = load_model(str(work / "int4-gptq"), device=opts.device)
        sample = generate_suite(1, seed=opts.seed, split="eval", mix=[Task.GROUND])[0]
        pic = work / "chat.png"
        sample.load_image().save(pic)
        query = tok4.from_list_format([{"image": str(pic)}, {"text": sample.question}])
        response, history = chat(int4, tok4, query, history=[], do_sample=False, max_new_tokens=32)
        drawn = draw_on_latest_picture(response, history[:-1], query)
        res.chat = {"question": sample.question, "response": response, "reference": sample.answer, "boxes": bool(drawn)}
        lap("chat")

        # 4. profile on the CPU with short contexts
        emit("profile", f"BF16 vs Int4, contexts {list(opts.profile_contexts)}")
        prof = run_profile(ProfileSettings(
            models=[str(model_dir), str(work / "int4-gptq")], engines=["hf", "fast"],
            contexts=list(opts.profile_contexts), runs=[1], device=opts.device, warmup_tokens=8, fast_compile="off",
        ))  # fmt: skip
        res.profile_summary = [
            {"precision": c.precision, "engine": c.engine, "context": c.context,
             "decode_tok_s": c.decode_tok_s, "status": c.status}  # fmt: skip
            for c in prof.speed
        ]
        lap("profile")

        # 5. compare: task accuracy of every variant; judge-free BF16 vs Int4 on a TouchStone-format slice
        evals = generate_suite(opts.n_eval, seed=opts.seed, split="eval")
        for name, desc, d in [("bf16", "the float checkpoint (fp16 on disk, fp32 on CPU)", model_dir)] + [
            (n, v[0], work / n) for n, v in variants.items()
        ]:
            emit("compare", f"task accuracy: {name}")
            m, t = load_model(str(d), device=opts.device)
            te = evaluate_tasks(m, t, evals, seed=opts.seed)
            res.variants.append(VariantScore(name, desc, te.scores, _dir_bytes(Path(d))))
        emit("compare", "judge-free BF16 vs Int4 (KL, top-1 agreement, exact match, box IoU)")
        tsv = write_touchstone_tsv(generate_suite(24, seed=opts.seed + 1, split="eval"), work / "touchstone.tsv")
        cmp = run_compare(CompareSettings(
            bf16=str(model_dir), int4=str(work / "int4-gptq"), data=str(tsv), max_new_tokens=32,
            device=opts.device, cache=str(work / "compare-cache"),
        )).report  # fmt: skip
        res.judge_free = [asdict(m) for m in cmp.judge_free]
        lap("compare")

        # 6. report
        emit("report", str(out))
        with atomic_dir(out, overwrite=True) as tmp:
            if drawn is not None:
                drawn.save(tmp / "grounding.png")
            write_profile(prof, tmp / "profile", overwrite=True)
            write_compare(cmp, tmp / "compare")
            tables = demo_tables(res)
            (tmp / "report.md").write_text(render_markdown(res, tables))
            save_tables_svg(tmp / "report.svg", tables, title="qvlq demo (qvlq-mini)")
            (tmp / "report.json").write_text(json.dumps(asdict(res), indent=2, default=str) + "\n")
        lap("report")
    finally:
        if not opts.work:
            shutil.rmtree(work, ignore_errors=True)
    return res


def demo_tables(res: DemoResult) -> list[TableSpec]:
    tasks = ["colour", "shape", "count", "exist", "ocr", "ground", "all"]
    acc_rows = []
    for v in res.variants:
        cells = []
        for t in tasks:
            s = v.accuracy.get(t)
            ci = "" if s is None else f" [{100 * s['ci_low']:.0f}, {100 * s['ci_high']:.0f}]"
            cells.append("n/a" if s is None else f"{100 * s['accuracy']:.1f}{ci}")
        acc_rows.append([v.name, *cells, f"{v.size_bytes / 1e6:.1f}"])
    q_rows = [[k, f"{v['gptq_loss']:.4g}", f"{v['rtn_loss']:.4g}"] for k, v in res.quantize_losses.items()]
    p_rows = [[p["precision"], p["engine"], str(p["context"]),
               "n/a" if p["decode_tok_s"] is None else f"{p['decode_tok_s']:.1f}", p["status"]]  # fmt: skip
              for p in res.profile_summary]
    t_rows = [[k, f"{v:.1f} s"] for k, v in res.seconds.items()]
    j_rows = [[m["name"], "n/a" if m["value"] is None else f"{m['value']:.4g}",
               "" if m["ci_low"] is None else f"[{m['ci_low']:.4g}, {m['ci_high']:.4g}]", str(m["n"])]  # fmt: skip
              for m in res.judge_free]
    return [
        TableSpec("Held-out task accuracy % [95% bootstrap CI] (greedy)", ["model", *tasks, "MB on disk"], acc_rows),
        TableSpec("Quantization: mean proxy loss per module (same Hessians)", ["variant", "loss", "RTN loss"], q_rows),
        TableSpec("Judge-free BF16 vs Int4 (GPTQ, multimodal calibration)", ["metric", "value", "95% CI", "n"], j_rows),
        TableSpec("CPU decode speed (qvlq-mini)", ["precision", "engine", "context", "tok/s", "status"], p_rows),
        TableSpec("Wall time per step", ["step", "time"], t_rows),
    ]


def _machine(e: dict[str, Any]) -> str:
    where = f"{e['device_name']} ({e['device']})"
    if e["device"] == "cpu":
        where = f"the CPU ({e['cpu']}, {e['torch_threads']} torch threads)"
    return f"{where}; torch {e['torch']}, transformers {e['transformers']}, Python {e['python']}, qvlq {e['qvlq']}"


def render_markdown(res: DemoResult, tables: list[TableSpec]) -> str:
    c = res.chat
    lines = [
        "# qvlq demo on qvlq-mini",
        "",
        f"- model: `{res.model}`; calibration: {res.calibration.get('samples')} samples, "
        f"{res.calibration.get('images')} images, image-token share {res.calibration.get('image_token_share', 0):.0%}",
        f"- chat (Int4): *{c.get('question')}* -> `{c.get('response')}` (reference `{c.get('reference')}`)"
        + (" — box drawn in grounding.png" if c.get("boxes") else ""),
        f"- ran on {_machine(res.environment)}",
        "- details: `profile/report.md`, `compare/report.md`",
        "",
    ]
    return "\n".join(lines + markdown_tables(tables)) + "\n"
