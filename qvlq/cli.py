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


def load_model_and_tokenizer(model_dir: str, device: str | None, dtype: str) -> tuple[Any, Any]:
    import qvlq  # noqa: F401  (registers the native classes)
    from transformers import AutoTokenizer

    from .model.loading import resolve_model_dir
    from .model.modeling import QWenLMHeadModel

    path = resolve_model_dir(model_dir)
    with console.status(f"loading {model_dir}"):
        model = QWenLMHeadModel.from_pretrained(path, device=device, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


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
    as_json: Annotated[bool, typer.Option("--json", help="Print the answer as JSON.")] = False,
) -> None:
    """Chat with a Qwen-VL-Chat model (one question, or interactive multi-turn without one)."""
    from .chat import chat_stream, draw_on_latest_picture

    model, tokenizer = load_model_and_tokenizer(model_dir, device, dtype)
    items = [{"image": p} for p in image or []]
    history: list[tuple[str, str]] = []

    def turn(text: str, stream: bool) -> str:
        query = tokenizer.from_list_format(items + [{"text": text}]) if not history else text
        response = ""
        for response in chat_stream(
            model, tokenizer, query, history, system=system, max_new_tokens=max_new_tokens,
            do_sample=sample, seed=seed,
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
