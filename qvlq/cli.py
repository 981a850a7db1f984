"""The `qvlq` command: parse arguments, call the library, render its results. Nothing else lives here."""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

app = typer.Typer(
    help="qvlq: Qwen-VL-Chat on today's stack — native model, multimodal GPTQ Int4, profiling, comparison.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()


def clean_errors(fn: Any) -> Any:
    """Bad input ends in one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except (ValueError, OSError, KeyError, RuntimeError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def emit_json(obj: Any) -> None:
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


@app.command("init-checkpoint")
@clean_errors
def init_checkpoint_cmd(
    out_dir: Annotated[Path, typer.Argument(help="Directory to create (official Qwen-VL-Chat layout).")],
    size: Annotated[str, typer.Option(help="tiny (seconds on CPU) or full (the real 9.6B geometry).")] = "tiny",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    dtype: Annotated[str, typer.Option(help="bf16, fp16 or fp32.")] = "bf16",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing directory.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Write a random-weight Qwen-VL-Chat checkpoint in the exact official layout."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    from .checkpoint import init_checkpoint, total_bytes

    total = total_bytes(size, dtype) if dtype in ("bf16", "fp16", "fp32") else None
    with Progress(
        "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TimeRemainingColumn(),
        console=console, transient=True,
    ) as bar:
        task = bar.add_task(f"init {size}", total=total)
        info = init_checkpoint(
            out_dir, size=size, seed=seed, dtype=dtype, overwrite=overwrite,
            on_tensor=lambda name, n: bar.advance(task, n),
        )
    if as_json:
        emit_json(info)
    else:
        out.print(
            f"wrote {info.path}: {info.size} Qwen-VL-Chat, {info.n_params:,} params, {info.dtype}, "
            f"{info.n_shards} shard(s), {info.total_bytes / 1e9:.2f} GB"
        )


INT4_KERNELS = (
    "fastest (CUDA: time every usable kernel per shape, keep the fastest), int4_cuda, triton, mma, int4_cpu, dequant"
)
INT4_AUTO = "auto (CUDA: $QVLQ_INT4_BACKEND, else int4_cuda; CPU: dequant)"


def load_model_and_tokenizer(
    model_dir: str, device: str | None, dtype: str, int4_kernel: str = "auto", stream_vision: bool = False,
    host_embedding: bool = False,
) -> tuple[Any, Any]:  # fmt: skip
    from .model.loading import load_model_and_tokenizer as load

    with console.status(f"loading {model_dir}"):
        return load(model_dir, device, dtype, int4_kernel, stream_vision, host_embedding)


STREAM_VISION_HELP = (
    "Keep the vision tower's blocks in host memory and stream them to the device per image: ~3.5 GB less device "
    "memory at full size, paid once per image in time to first token; decode speed is unchanged."
)
HOST_EMBEDDING_HELP = (
    "Keep the token-embedding table in pinned host memory, read by the GPU in place (one row a token): 1.2 GB less "
    "device memory at full size, for bus latency per step. CUDA only."
)


@app.command("chat")
@clean_errors
def chat_cmd(
    model_dir: Annotated[str, typer.Argument(help="Model directory (official layout) or hub id.")],
    question: Annotated[str | None, typer.Argument(help="The question; omit for an interactive chat.")] = None,
    image: Annotated[list[str] | None, typer.Option("--image", help="Picture(s) for the first turn.")] = None,
    system: Annotated[str, typer.Option(help="System prompt.")] = "You are a helpful assistant.",
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer in tokens.")] = 512,
    sample: Annotated[
        bool | None, typer.Option("--sample/--greedy", help="Sampling or greedy (default: generation_config).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for sampling.")] = 0,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 (default: cuda if available).")] = None,
    dtype: Annotated[str, typer.Option(help="auto, bf16, fp16 or fp32.")] = "auto",
    draw: Annotated[Path | None, typer.Option(help="Save the latest picture with the answer's boxes here.")] = None,
    engine: Annotated[
        str, typer.Option(help="auto (CUDA: static cache + CUDA graph; else the HF loop), hf or fast.")
    ] = "auto",
    int4_kernel: Annotated[str, typer.Option(help=f"Int4 layers: {INT4_KERNELS} or {INT4_AUTO}.")] = "auto",
    stream_vision: Annotated[bool, typer.Option(help=STREAM_VISION_HELP)] = False,
    host_embedding: Annotated[bool, typer.Option(help=HOST_EMBEDDING_HELP)] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")] = False,
) -> None:
    """Chat with a Qwen-VL-Chat model (one question, or interactive multi-turn without one)."""
    from .chat import chat_stream, draw_on_latest_picture
    from .int4 import backend_problem
    from .model.loading import resolve_device

    problem = backend_problem(int4_kernel, resolve_device(device))  # compare's settings check it likewise
    if problem:
        raise ValueError(f"--int4-kernel {problem}")
    model, tokenizer = load_model_and_tokenizer(model_dir, device, dtype, int4_kernel, stream_vision, host_embedding)
    items = [{"image": p} for p in image or []]
    history: list[tuple[str, str]] = []

    def turn(text: str, stream: bool) -> str:
        query = tokenizer.from_list_format(items + [{"text": text}]) if not history else text
        response = ""
        for response in chat_stream(
            model, tokenizer, query, history, system=system, max_new_tokens=max_new_tokens,
            do_sample=sample, seed=seed, engine=engine,
        ):
            if stream:
                out.print(response, end="\r", highlight=False, markup=False)
        response = response.strip()
        if draw is not None:
            pic = draw_on_latest_picture(response, history, query)
            if pic is not None:
                pic.save(draw)
                console.print(f"boxes drawn on the latest picture: {draw}")
        history.append((query, response))
        return response

    if question is not None:
        response = turn(question, stream=False)
        if as_json:
            emit_json({"question": question, "images": image or [], "response": response})
        else:
            out.print(response, highlight=False, markup=False)
        return
    console.print("interactive chat: empty line or Ctrl-D to quit, ':clear' to forget the history")
    while True:
        try:
            text = input("user> ").strip()
        except EOFError:
            break
        if not text:
            break
        if text == ":clear":
            history.clear()
            continue
        out.print("assistant> " + turn(text, stream=False), highlight=False, markup=False)


@app.command("calibrate")
@clean_errors
def calibrate_cmd(
    data: Annotated[
        Path, typer.Argument(help="Finetune JSON/JSONL, a save_to_disk dataset dir, a parquet file or a .txt.")
    ],
    model_dir: Annotated[str, typer.Option("--model", help="Model directory: tokenizer and config (no weights).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Bundle directory to write.")],
    num_samples: Annotated[int, typer.Option(help="Rows to sample.")] = 128,
    max_len: Annotated[int, typer.Option(help="Tokens per sample (never splits an image span).")] = 2048,
    seed: Annotated[int, typer.Option(help="Seed of the row sample.")] = 0,
    fmt: Annotated[str, typer.Option("--format", help="auto, json, jsonl, datasets, parquet or txt.")] = "auto",
    strict: Annotated[bool, typer.Option(help="Fail on the first bad row instead of skipping it.")] = False,
    text_only: Annotated[bool, typer.Option(help="Drop the pictures (and their 'Picture N: ' text).")] = False,
    pixel_dtype: Annotated[str, typer.Option(help="Pixels in the bundle: fp32 (exact) or fp16 (half size).")] = "fp32",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the stats as JSON.")] = False,
) -> None:
    """Build a calibration bundle (token ids + preprocessed pictures) for multimodal GPTQ."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
    from rich.table import Table

    from .calibrate import calibrate

    with Progress(
        "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console, transient=True,
    ) as bar:
        task = bar.add_task("calibration samples", total=None)
        calib = calibrate(
            data, model_dir, out_dir, overwrite=overwrite, pixel_dtype=pixel_dtype, num_samples=num_samples,
            max_len=max_len, seed=seed, strict=strict, text_only=text_only, fmt=fmt,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    st = calib.stats
    if as_json:
        emit_json({"bundle": str(out_dir), "stats": dataclasses.asdict(st)})
        return
    table = Table(title=f"calibration bundle {out_dir}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    sha = ", ".join(f"{k} {v[:12]}" for k, v in st.source_sha256.items()) if len(st.source_sha256) <= 3 else (
        f"{len(st.source_sha256)} files"
    )
    rows = [
        ("source", f"{st.source} ({st.format}{', text only' if st.text_only else ''})"),
        ("sha256", sha),
        ("samples", f"{st.samples} of {st.num_samples_requested} requested (seed {st.seed}); "
                    f"{st.rows_examined} of {st.rows_total} rows examined"),
        ("tokens", f"{st.total_tokens:,} total; mean {st.mean_tokens:.1f}, min {st.min_tokens}, max {st.max_tokens}"
                   f" (max_len {st.max_len})"),
        ("images", f"{st.images} ({st.image_tokens:,} image tokens, {st.image_token_share:.1%} of all)"),
        ("truncated", f"{st.truncated_samples} samples, {st.images_dropped_by_truncation} images dropped"),
        ("skipped", ", ".join(f"{k} {v}" for k, v in st.skipped.items()) or "none"),
    ]  # fmt: skip
    if st.note:
        rows.append(("note", st.note))
    for k, v in rows:
        table.add_row(k, v)
    out.print(table)


@app.command("quantize")
@clean_errors
def quantize_cmd(
    model_dir: Annotated[str, typer.Argument(help="BF16/FP16 Qwen-VL-Chat directory (official layout) or hub id.")],
    calib: Annotated[str, typer.Option(help="Calibration bundle (qvlq calibrate) or DATA to calibrate on the fly.")],
    out: Annotated[Path, typer.Option(help="Output directory: a drop-in for the official Int4 checkpoint.")],
    preset: Annotated[
        Path | None, typer.Option(help="Quantization preset JSON (configs/); options below override it.")
    ] = None,
    bits: Annotated[int | None, typer.Option(help="2, 3, 4 or 8 (default 4).")] = None,
    group_size: Annotated[int | None, typer.Option(help="-1, 32, 64 or 128 (default 128).")] = None,
    sym: Annotated[bool | None, typer.Option("--sym/--asym", help="Symmetric (default) or asymmetric.")] = None,
    desc_act: Annotated[bool | None, typer.Option("--desc-act/--no-desc-act", help="Act-order.")] = None,
    static_groups: Annotated[bool | None, typer.Option("--static-groups/--no-static-groups")] = None,
    damp_percent: Annotated[float | None, typer.Option(help="Hessian damping (default 0.01).")] = None,
    act_group_aware: Annotated[
        bool | None,
        typer.Option(
            "--act-group-aware/--no-act-group-aware",
            help="GAR: act-order inside each group; lower error, same files as --no-desc-act (default off).",
        ),
    ] = None,
    true_sequential: Annotated[bool, typer.Option("--true-sequential/--no-true-sequential")] = True,
    method: Annotated[str, typer.Option(help="gptq, or rtn for the round-to-nearest baseline.")] = "gptq",
    num_samples: Annotated[int, typer.Option(help="When calibrating on the fly: samples.")] = 128,
    max_len: Annotated[int, typer.Option(help="When calibrating on the fly: tokens per sample.")] = 2048,
    seed: Annotated[int, typer.Option(help="When calibrating on the fly: sampling seed.")] = 0,
    text_only: Annotated[bool, typer.Option(help="When calibrating on the fly: drop the images.")] = False,
    adapter: Annotated[Path | None, typer.Option(help="peft LoRA adapter merged into the model first.")] = None,
    device: Annotated[str | None, typer.Option(help="cuda, cuda:1 or cpu (default: cuda if available).")] = None,
    offload: Annotated[str, typer.Option(help="Where calibration activations live: auto, cpu or device.")] = "auto",
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run (byte-identical result).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """GPTQ-quantize Qwen-VL-Chat with multimodal calibration into the official Int4 layout."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from .calibrate import load_calibration
    from .model.loading import read_config, resolve_model_dir
    from .quantize import quantize, render_quantize_log, spec_from_options
    from .tokenizer import QWenTokenizer

    if Path(out).exists() and not overwrite and not resume:
        raise ValueError(f"{out} already exists (pass --overwrite to replace it)")
    spec = spec_from_options(
        preset, bits=bits, group_size=group_size, sym=sym, desc_act=desc_act, static_groups=static_groups,
        damp_percent=damp_percent, act_group_aware=act_group_aware,
    )
    src = resolve_model_dir(model_dir)
    tokenizer = QWenTokenizer.from_pretrained(str(src))
    calibration = load_calibration(
        calib, tokenizer, read_config(src), num_samples=num_samples, max_len=max_len, seed=seed,
        text_only=text_only,
    )
    with Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console,
    ) as bar:
        tasks: dict[str, Any] = {}

        def on_event(kind: str, **e: Any) -> None:
            if kind == "start":
                console.print(
                    f"{e['n_samples']} samples, {e['n_tokens']:,} tokens, {e['n_blocks']} blocks; "
                    f"activations on {e['store']}; rough estimate {e['estimate'] / 60:.1f} min"
                )
                tasks["capture"] = bar.add_task("capture", total=e["n_samples"], info="vision + embeddings")
                tasks["blocks"] = bar.add_task("blocks", total=e["n_blocks"], info="")
            elif kind == "capture":
                bar.update(tasks["capture"], completed=e["done"])
            elif kind == "module":
                info = f"h.{e['block']}.{e['module']} loss {e['gptq_loss']:.3g} (rtn {e['rtn_loss']:.3g})"
                bar.update(tasks["blocks"], info=info)
            elif kind in ("block_done", "block_resumed"):
                bar.advance(tasks["blocks"])
            elif kind == "write":
                bar.update(tasks["blocks"], info=f"writing {e['out']}")

        result = quantize(
            src, calibration, out, spec, true_sequential=true_sequential, device=device, overwrite=overwrite,
            resume=resume, adapter=adapter, offload=offload, method=method, on_event=on_event,
        )
    if as_json:
        emit_json(result)
    else:
        console.print(render_quantize_log(result))
        console.print(f"wrote {result.out} in {result.seconds:.1f} s")


@app.command("profile")
@clean_errors
def profile_cmd(
    models: Annotated[
        list[str] | None, typer.Argument(help="BF16 and/or Int4 model directories (labelled from their config).")
    ] = None,
    random_weights: Annotated[
        str | None, typer.Option(help="Profile the architecture with random weights on the device: full or tiny.")
    ] = None,
    precisions: Annotated[str, typer.Option(help="With --random-weights: bf16,int4 (Int4 = RTN g128).")] = "bf16,int4",
    engine: Annotated[str, typer.Option(help="hf, fast or both.")] = "both",
    contexts: Annotated[str, typer.Option(help="Totals: generate context-258 tokens after the image.")] = "2048,8192",
    runs: Annotated[str | None, typer.Option(help="Measured runs after the warm-up: N, or one per context.")] = None,
    device: Annotated[str | None, typer.Option(help="cuda, cuda:1 or cpu (default: cuda if available).")] = None,
    dtype: Annotated[str, typer.Option(help="Model directories: auto, bf16, fp16 or fp32.")] = "auto",
    int4_dtype: Annotated[str, typer.Option(help="Random Int4 variant's other weights: fp16 or bf16.")] = "fp16",
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Report directory (default reports/profile/<device>-<date>).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing report directory.")] = False,
    max_seconds: Annotated[
        float | None, typer.Option(help="Wall-clock budget: cells that would not fit are reported as skipped.")
    ] = None,
    windowed: Annotated[
        str, typer.Option(help="ENGINE@CONTEXT cells whose decode rate is estimated from windows, e.g. hf@8192.")
    ] = "",
    window_tokens: Annotated[int, typer.Option(help="Decoded tokens per window.")] = 64,
    window_points: Annotated[int, typer.Option(help="Windows per windowed cell.")] = 5,
    warmup_tokens: Annotated[int, typer.Option(help="Tokens of the warm-up run (0 = full length).")] = 64,
    crosscheck_tokens: Annotated[int, typer.Option(
        help="Leading greedy tokens compared across engines (one engine: against a short HF-loop run).")] = 32,
    fast_compile: Annotated[
        str, typer.Option(help="FastEngine compile: auto, off (CUDA graph of the eager step), on, or a mode.")
    ] = "auto",
    kv_block: Annotated[
        int | None, typer.Option(help="FastEngine KV bucket size for --attention sdpa/math (default: whole cache).")
    ] = None,
    attention: Annotated[
        str | None,
        typer.Option(help="FastEngine decode attention: fastest (CUDA: SDPA and the Triton split-KV kernel timed, the "
                     "faster kept), sdpa, math or triton. Default: fastest, sdpa with --kv-block."),
    ] = None,  # fmt: skip
    fuse: Annotated[
        str,
        typer.Option(help="FastEngine Int4 fusion (mma kernel): block (RMSNorms, MLP gate and residual adds inside "
                     "four launches a layer), mlp (w1 + w2 and the gate only) or off."),
    ] = "block",  # fmt: skip
    int4_kernel: Annotated[
        str | None,
        typer.Option(help=f"Int4 layers: {INT4_KERNELS} or auto. Default: $QVLQ_INT4_BACKEND, else fastest."),
    ] = None,  # fmt: skip
    stream_vision: Annotated[bool, typer.Option(help=STREAM_VISION_HELP)] = False,
    host_embedding: Annotated[bool, typer.Option(help=HOST_EMBEDDING_HELP)] = False,
    seed: Annotated[int, typer.Option(help="Seed of the random weights and pixels.")] = 0,
    render: Annotated[
        Path | None,
        typer.Option(help="Run nothing: render this report.json again (tables, markdown, SVG, plots) into --out."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Speed and memory of BF16 vs Int4 on the seed's protocol (one image + text, generate context-258 tokens)."""
    import time

    from .int4 import env_backend
    from .profile import ProfileReport, ProfileSettings, parse_engines, parse_int_list, parse_windowed, run_profile
    from .profile_report import check_out_dir, load_report, report_json, report_tables, write_report
    from .report import render_rich

    def show(report: ProfileReport, path: Path) -> None:
        console.print(f"report written to {path}/ (report.md, report.json, report.svg, speed.png, memory.png)")
        if as_json:
            emit_json(report_json(report))
        else:
            for note in report.notes:
                out.print(note, highlight=False, markup=False)
            for table in render_rich(report_tables(report)):
                out.print(table)

    if render is not None:
        if out_dir is None or models:
            raise ValueError("--render takes no models and needs --out (the directory to write)")
        report = load_report(render)
        show(report, write_report(report, check_out_dir(out_dir, None, overwrite), overwrite=overwrite))
        return
    ctx = parse_int_list(contexts, "--contexts")
    settings = ProfileSettings(
        models=list(models or []), random_weights=random_weights,
        precisions=[p for p in precisions.replace(" ", "").split(",") if p], engines=parse_engines(engine),
        contexts=ctx, runs=parse_int_list(runs, "--runs") if runs else None, device=device, dtype=dtype,
        int4_dtype=int4_dtype, max_seconds=max_seconds, windowed=parse_windowed(windowed),
        window_tokens=window_tokens, window_points=window_points, warmup_tokens=warmup_tokens,
        crosscheck_tokens=crosscheck_tokens, fast_compile=fast_compile, kv_block=kv_block, seed=seed,
        attention=attention or ("sdpa" if kv_block else "fastest"), fuse=fuse,
        int4_kernel=int4_kernel or env_backend() or "fastest", stream_vision=stream_vision,
        host_embedding=host_embedding,
    )  # fmt: skip
    settings.validate()
    path = check_out_dir(out_dir, device, overwrite)
    t0 = time.monotonic()

    def log(msg: str) -> None:
        console.print(f"[dim]{time.strftime('%H:%M:%S')} +{time.monotonic() - t0:6.1f}s[/] {msg}", highlight=False)

    report = run_profile(settings, log=log)
    show(report, write_report(report, path, overwrite=overwrite))


@app.command("train-mini")
@clean_errors
def train_mini_cmd(
    out_dir: Annotated[Path, typer.Argument(help="Directory to create (official layout + train_log.json).")],
    steps: Annotated[
        int, typer.Option(help="Planned steps (cosine length); with --time-budget, cut to what fits.")
    ] = 30000,
    batch: Annotated[int, typer.Option(help="Samples per step.")] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 2e-3,
    warmup: Annotated[int, typer.Option(help="Linear warmup steps.")] = 300,
    seed: Annotated[int, typer.Option(help="Seed of the data, the init and the batch order.")] = 0,
    size: Annotated[str, typer.Option(help="mini (bigger), small (the shipped size) or micro (tests).")] = "mini",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1.")] = "auto",
    time_budget: Annotated[
        float | None, typer.Option(help="Seconds for the whole run; the schedule is fitted to it, then it stops.")
    ] = None,
    pool: Annotated[int | None, typer.Option(help="Training samples rendered up front (default: by steps).")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch (1 on a busy machine).")] = None,
    workers: Annotated[
        int | None, typer.Option(help="Rendering processes (default: cores - 1, at most 12; 1 = inline).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing directory.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Train qvlq-mini (a small Qwen-VL-Chat) on the synthetic task suite and write it in the official layout."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.progress import TimeRemainingColumn as Eta

    from .mini.train import TrainOptions, train_mini

    opts = TrainOptions(
        steps=steps, batch=batch, lr=lr, warmup=warmup, seed=seed, size=size, device=device,
        time_budget=time_budget, pool=pool, threads=threads, workers=workers,
    )
    with Progress(
        "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), Eta(), console=console,
    ) as bar:
        task = bar.add_task("train", total=steps, info="", visible=False)
        plain = {"every": max(1, steps // 10), "next": 0}  # no live bar off a terminal: print lines instead

        def report(event: str, info: dict) -> None:
            if event == "phase":
                console.print(f"[dim]{info['name']}[/]", highlight=False)
            elif event == "plan":
                if "device" in info:
                    console.print(f"{info['n_params']:,} parameters, pool {info['pool']}, device {info['device']}")
                bar.update(task, total=info["planned"], visible=True)
                plain["every"] = max(1, info["planned"] // 10)
            elif event == "tick":
                bar.update(task, completed=info["step"])
            elif event == "step":
                aux = f" aux {info['aux_loss']:.3f}" if info.get("aux_loss") is not None else ""
                text = f"loss {info['loss']:.4f}{aux} lr {info['lr']:.2e}"
                bar.update(task, completed=info["step"], info=text)
                if not console.is_terminal and info["step"] >= plain["next"]:
                    plain["next"] = info["step"] + plain["every"]
                    line = f"step {info['step']}/{info['planned']} {text} {info['elapsed']:.0f}s"
                    console.print(line, highlight=False)
            elif event == "eval":
                accs = "  ".join(f"{k} {v:.0%}" for k, v in info["accuracy"].items())
                label = "final (reloaded checkpoint)" if info.get("final") else f"step {info['step']}"
                bar.console.print(f"eval {label}: {accs}", highlight=False)

        result = train_mini(out_dir, opts, overwrite=overwrite, callback=report)
    if as_json:
        emit_json({k: v for k, v in dataclasses.asdict(result).items() if k != "log"})
    else:
        early = " (stopped early: time budget)" if result.stopped_early else ""
        out.print(
            f"wrote {result.path}: {result.steps}/{result.planned_steps} steps{early} in {result.seconds:.0f}s on "
            f"{result.device}; final loss {result.final_loss:.4f}; "
            f"held-out accuracy {result.eval['all']['accuracy']:.1%}"
        )


@app.command("eval-tasks")
@clean_errors
def eval_tasks_cmd(
    model_dir: Annotated[str, typer.Argument(help="A qvlq-mini-layout model directory (float or GPTQ).")],
    n: Annotated[int, typer.Option(help="Held-out samples (split 'eval').")] = 300,
    seed: Annotated[int, typer.Option(help="Suite seed.")] = 0,
    batch: Annotated[int, typer.Option(help="Samples decoded together (batched method).")] = 64,
    method: Annotated[str, typer.Option(help="batched (token-exact with chat) or chat (one by one).")] = "batched",
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 (default: cuda if available).")] = None,
    dtype: Annotated[str, typer.Option(help="auto, bf16, fp16 or fp32.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Score a model on the synthetic task suite: greedy answers, per-task accuracy with bootstrap 95% CIs."""
    from rich.table import Table

    from .mini.evaluate import evaluate_dir

    with console.status(f"evaluating {model_dir} on {n} held-out samples"):
        res = evaluate_dir(model_dir, n, seed, batch_size=batch, method=method, device=device, dtype=dtype)
    if as_json:
        emit_json({"model": model_dir, "n": res.n, "seed": seed, "method": res.method,
                   "seconds": round(res.seconds, 2), "scores": res.scores})  # fmt: skip
        return
    table = Table(title=f"{model_dir}: held-out task accuracy (greedy, n={res.n}, seed {seed})")
    for col in ("task", "n", "accuracy", "95% CI"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for task, s in res.scores.items():
        table.add_row(task, str(s["n"]), f"{s['accuracy']:.1%}", f"{s['ci_low']:.1%} - {s['ci_high']:.1%}")
    out.print(table)


@app.command("compare")
@clean_errors
def compare_cmd(
    bf16: Annotated[str, typer.Option(help="BF16 model directory (official layout) or hub id.")],
    int4: Annotated[str, typer.Option(help="GPTQ Int4 model directory or hub id.")],
    data: Annotated[Path, typer.Option(help="TouchStone TSV (touchstone_20230831.tsv layout).")],
    category: Annotated[str | None, typer.Option(help="Only items in this category (comma list: any).")] = None,
    task: Annotated[str | None, typer.Option(help="Only items of this task_name.")] = None,
    lang: Annotated[str | None, typer.Option(help="en or zh (zh: the question holds a Han ideograph).")] = None,
    limit: Annotated[int | None, typer.Option(help="Stratified sample of N items (category proportions kept).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the --limit sample and of --sample decoding.")] = 0,
    judge: Annotated[str, typer.Option(help="none or openai (any OpenAI-compatible endpoint).")] = "none",
    judge_url: Annotated[str, typer.Option(help="Judge base URL (POST {url}/chat/completions).")] = (
        "https://api.openai.com/v1"
    ),
    judge_model: Annotated[str, typer.Option(help="Judge model name.")] = "gpt-4",
    judge_key_env: Annotated[str, typer.Option(help="Environment variable holding the judge API key.")] = (
        "OPENAI_API_KEY"
    ),
    judge_workers: Annotated[int, typer.Option(help="Concurrent judge requests.")] = 4,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer in tokens.")] = 512,
    sample: Annotated[bool, typer.Option("--sample/--greedy", help="Seeded sampling or greedy (default).")] = False,
    temperature: Annotated[float, typer.Option(help="With --sample.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="With --sample.")] = 1.0,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 (default: cuda if available).")] = None,
    dtype: Annotated[str, typer.Option(help="auto, bf16, fp16 or fp32 (both models).")] = "auto",
    engine: Annotated[
        str, typer.Option(help="Decoding: auto (CUDA: static cache + CUDA graph; else the HF loop), hf or fast.")
    ] = "auto",
    int4_kernel: Annotated[str, typer.Option(help=f"The Int4 model's layers: {INT4_KERNELS} or {INT4_AUTO}.")] = "auto",
    stream_vision: Annotated[bool, typer.Option(help=STREAM_VISION_HELP)] = False,
    host_embedding: Annotated[bool, typer.Option(help=HOST_EMBEDDING_HELP)] = False,
    cache: Annotated[Path | None, typer.Option(help="Response/judge cache directory (default OUT/cache).")] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Report directory (default reports/compare/<bf16>-vs-<int4>).")
    ] = None,
    shard: Annotated[str | None, typer.Option(help="Only shard i/n (items i::n), into the cache; no report.")] = None,
    merge: Annotated[bool, typer.Option(help="Only build the report from the cache of finished shards.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """BF16 vs Int4 on TouchStone: both models answer through the chat API, a judge scores them (optional),
    and teacher-forced KL / top-1 agreement / exact match measure the difference without one.
    Under torchrun (RANK/WORLD_SIZE) every rank does items rank::world and rank 0 writes the report."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from . import compare as cmp

    settings = cmp.CompareSettings(
        bf16=bf16, int4=int4, data=str(data), category=category, task=task, lang=lang, limit=limit, seed=seed,
        max_new_tokens=max_new_tokens, sample=sample, temperature=temperature, top_p=top_p, judge=judge,
        judge_url=judge_url, judge_model=judge_model, judge_key_env=judge_key_env, judge_workers=judge_workers,
        device=device, dtype=dtype, engine=engine, int4_kernel=int4_kernel, stream_vision=stream_vision,
        host_embedding=host_embedding, cache=str(cache) if cache else None, out=str(out_dir) if out_dir else None,
    )  # fmt: skip
    with Progress(
        "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True,
    ) as bar:
        tasks: dict[str, Any] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        result = cmp.run_compare(
            settings, shard=cmp.parse_shard(shard) if shard else None, merge_only=merge, progress=progress,
            loader=lambda d: load_model_and_tokenizer(d, device, dtype, int4_kernel, stream_vision, host_embedding),
        )  # fmt: skip
    if result.report is None:
        sh = result.shard
        if as_json and shard:  # torchrun ranks > 0 stay off stdout: rank 0 prints the report there
            emit_json(sh)
        elif sh is not None:
            console.print(f"shard {sh.rank}/{sh.world}: {sh.items} items, generated {sh.generated}, "
                          f"teacher-forced {sh.teacher_forced} in {sh.seconds:.1f} s")  # fmt: skip
        return
    path = cmp.write_report(result.report, cmp.out_dir(settings))
    console.print(f"report written to {path}/ (report.md, report.json, report.svg)")
    if as_json:
        emit_json(cmp.report_json(result.report))
    else:
        for table in cmp.rich_tables(result.report):
            out.print(table)


@app.command("demo")
@clean_errors
def demo_cmd(
    model: Annotated[str | None, typer.Option(help="A qvlq-mini-layout model (default: the shipped one).")] = None,
    out: Annotated[Path, typer.Option(help="Report directory.")] = Path("reports/demo"),
    n_calib: Annotated[int, typer.Option(help="Calibration samples.")] = 64,
    n_eval: Annotated[int, typer.Option(help="Held-out samples scored per model.")] = 150,
    seed: Annotated[int, typer.Option(help="Seed of the task suite samples.")] = 0,
    work: Annotated[Path | None, typer.Option(help="Keep the intermediate checkpoints here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """The whole pipeline on qvlq-mini: calibrate -> quantize -> chat -> profile -> compare -> report."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .demo import STEPS, DemoOptions, demo_tables, run_demo
    from .report import render_rich

    opts = DemoOptions(model=model, out=str(out), n_calib=n_calib, n_eval=n_eval, seed=seed,
                       work=str(work) if work else None)  # fmt: skip
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[msg]}"))
    with Progress(*columns, TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("demo", total=len(STEPS), msg="")
        seen: list[str] = []

        def on_event(step: str, msg: str) -> None:
            if step not in seen:
                seen.append(step)
                bar.update(task, completed=len(seen) - 1)
            bar.update(task, description=step, msg=msg)

        result = run_demo(opts, on_event)
        bar.update(task, completed=len(STEPS), msg="done")
    if as_json:
        emit_json(result)
        return
    for t in render_rich(demo_tables(result)):
        console.print(t)
    console.print(f"chat (Int4): {result.chat.get('response')!r}; report in {result.out}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
