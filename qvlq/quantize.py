"""qvlq quantize: multimodal GPTQ of Qwen-VL-Chat into a drop-in copy of the official Int4 checkpoint.

Flow (one block on the device at a time):
  1. Layer-0 inputs are captured from the real embedding path: token embeddings with the vision
     tower's features written into every image span, so calibration activations contain image tokens.
  2. For block N, modules are quantized in true-sequential groups
     [c_attn] -> [attn.c_proj] -> [w1, w2] -> [mlp.c_proj]: each group's Hessian is collected from a
     forward of the block in which the earlier groups already use their quantized weights.
  3. The block's outputs, recomputed through the quantized block, are block N+1's inputs.
  4. Each finished block is checkpointed; `resume` replays finished blocks (forward only) and goes on,
     so an interrupted run ends byte-identical to an uninterrupted one.
Weights stream from the safetensors shards; the vision tower, wte, ln_f, lm_head and all norms are
written untouched in fp16, as in the official Int4."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .gptq import GPTQ, QuantSpec, round_to_nearest
from .int4 import dequantize_gptq_v1, quantized_state_dict_entries
from .io import atomic_dir, plan_shards, write_json, write_shards
from .lora import LoraAdapter
from .model.config import QWenConfig
from .model.loading import QUANTIZED_LINEARS, read_config, resolve_model_dir
from .model.modeling import QWenLMHeadModel, ntk_alpha

SEQUENTIAL_GROUPS: list[list[str]] = [["attn.c_attn"], ["attn.c_proj"], ["mlp.w1", "mlp.w2"], ["mlp.c_proj"]]
MAX_SHARD_BYTES = 2_000_000_000
QUANT_FILE_KEYS = ("bits", "group_size", "damp_percent", "desc_act", "static_groups", "sym", "true_sequential")
Event = Callable[..., None]


@dataclass
class ModuleLog:
    block: int
    module: str
    gptq_loss: float
    rtn_loss: float
    samples: int
    damp: float
    seconds: float


@dataclass
class QuantizeResult:
    out: str
    source: str
    spec: dict[str, Any]
    device: str
    compute_dtype: str
    n_blocks: int
    calibration: dict[str, Any]
    modules: list[ModuleLog] = field(default_factory=list)
    resumed_blocks: int = 0
    seconds: float = 0.0
    peak_device_bytes: int | None = None
    peak_rss_bytes: int = 0


class WeightReader:
    """Tensors by name from a safetensors checkpoint, opened lazily; LoRA deltas merged on read."""

    def __init__(self, model_dir: Path, adapter: LoraAdapter | None = None) -> None:
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            wm = json.loads(index.read_text())["weight_map"]
            self.where = {k: model_dir / f for k, f in wm.items()}
        elif (model_dir / "model.safetensors").is_file():
            with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
                self.where = {k: model_dir / "model.safetensors" for k in f.keys()}  # noqa: SIM118
        else:
            raise ValueError(f"{model_dir}: quantize reads safetensors checkpoints only (no model.safetensors found)")
        self.adapter = adapter
        self._open: dict[Path, Any] = {}

    def names(self) -> list[str]:
        return list(self.where)

    def get(self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        path = self.where[name]
        if path not in self._open:
            try:
                self._open[path] = safe_open(str(path), "pt")
            except Exception as e:
                raise ValueError(f"corrupt or truncated weights file {path}: {e}") from None
        t = self._open[path].get_tensor(name)
        if self.adapter is not None:
            t = self.adapter.merge(name, t)
        return t.to(device=device, dtype=dtype if t.is_floating_point() and dtype else t.dtype)

    def load_module(self, module: nn.Module, prefix: str, device: torch.device, dtype: torch.dtype) -> None:
        """Materialise a meta-built submodule with its weights from the checkpoint."""
        sd = {k: self.get(f"{prefix}{k}", device, dtype) for k in module.state_dict()}
        module.load_state_dict(sd, assign=True)


def _fingerprint(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _compute_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class _Stop(Exception):
    """Raised from a hook once every module of the current group has seen its input."""


def _block_forward(block: nn.Module, model: QWenLMHeadModel, h: torch.Tensor) -> torch.Tensor:
    cfg = model.config
    s = h.shape[1]
    alpha = ntk_alpha(s, cfg.seq_length) if cfg.use_dynamic_ntk else 1.0  # eval semantics, as at inference
    cos, sin, logn = model.transformer.position_inputs(0, s, alpha, h.device)
    return block(h, cos, sin, logn, None, None)


def _submodule(block: nn.Module, name: str) -> nn.Linear:
    parent, attr = name.split(".")
    return getattr(getattr(block, parent), attr)


def validate_request(config: QWenConfig, spec: QuantSpec) -> None:
    if config.is_quantized:
        raise ValueError("the model is already quantized (its config has a quantization_config)")
    spec.validate()
    h, ff = config.hidden_size, config.intermediate_size // 2
    proj = config.kv_channels * config.num_attention_heads
    for name, (out_f, in_f) in {
        "attn.c_attn": (3 * proj, h), "attn.c_proj": (h, proj), "mlp.w1": (ff, h), "mlp.w2": (ff, h),
        "mlp.c_proj": (h, ff),
    }.items():
        try:
            spec.validate(in_f, out_f)
        except ValueError as e:
            raise ValueError(f"{name} [{out_f}x{in_f}]: {e}") from None


def estimate_seconds(config: QWenConfig, n_tokens: int, device: torch.device) -> float:
    """Rough wall-time estimate from the block FLOPs (5 passes per block) and a measured matmul rate."""
    h, ff = config.hidden_size, config.intermediate_size // 2
    block_params = 4 * h * h + 3 * h * ff
    flops = 2 * block_params * n_tokens * 5 * config.num_hidden_layers
    gptq = config.num_hidden_layers * (4 * h**3 + 3 * ff**3 + 2 * h * h * ff) * 2
    a = torch.randn(1024, 1024, device=device)
    t = time.perf_counter()
    for _ in range(4):
        a @ a
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = 4 * 2 * 1024**3 / max(time.perf_counter() - t, 1e-6)
    return (flops + gptq) / rate


def int4_inventory(config: QWenConfig, spec: QuantSpec, true_sequential: bool = True) -> dict[str, tuple]:
    """(shape, dtype) of every tensor an Int4 output holds, from the loader's own meta-built layout, so
    what quantize writes, what the loader expects and the official index can be compared directly."""
    from .model.loading import replace_quantized_linears

    cfg = QWenConfig(**config.to_dict())
    cfg.quantization_config = _official_quant_config(spec, true_sequential) | {"quant_method": "gptq"}
    with torch.device("meta"):
        model = QWenLMHeadModel(cfg)
    replace_quantized_linears(model, cfg)
    return {
        k: (tuple(v.shape), torch.float16 if v.is_floating_point() else v.dtype) for k, v in model.state_dict().items()
    }


def spec_from_options(preset: str | Path | None = None, **overrides: Any) -> QuantSpec:
    """A QuantSpec from a preset file (the official quantize_config.json keys) and explicit overrides."""
    values: dict[str, Any] = {}
    if preset is not None:
        try:
            data = json.loads(Path(preset).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read preset {preset}: {e}") from None
        known = {"bits", "group_size", "sym", "desc_act", "static_groups", "damp_percent", "act_group_aware"}
        values = {k: v for k, v in data.items() if k in known}
    values.update({k: v for k, v in overrides.items() if v is not None})
    spec = QuantSpec(**values)
    spec.validate()
    return spec


def render_quantize_log(result: QuantizeResult, max_rows: int = 40) -> Any:
    """A rich table of the per-module log (GPTQ vs RTN proxy loss)."""
    from rich.table import Table

    t = Table(title=f"GPTQ {result.spec['bits']}-bit g{result.spec['group_size']} on {result.device}")
    for c in ("block", "module", "GPTQ loss", "RTN loss", "RTN/GPTQ", "samples", "damp", "s"):
        t.add_column(c, justify="left" if c == "module" else "right", no_wrap=c == "module")
    rows = result.modules if len(result.modules) <= max_rows else result.modules[:max_rows]
    for m in rows:
        ratio = m.rtn_loss / m.gptq_loss if m.gptq_loss > 0 else float("inf")
        t.add_row(str(m.block), m.module, f"{m.gptq_loss:.4g}", f"{m.rtn_loss:.4g}", f"{ratio:.1f}x",
                  str(m.samples), f"{m.damp:g}", f"{m.seconds:.2f}")
    if len(result.modules) > max_rows:
        t.caption = f"first {max_rows} of {len(result.modules)} modules; all in quantize_log.json"
    return t


def _official_quant_config(spec: QuantSpec, true_sequential: bool) -> dict[str, Any]:
    return {
        "bits": spec.bits, "group_size": spec.group_size, "damp_percent": spec.damp_percent,
        "desc_act": spec.desc_act, "static_groups": spec.static_groups, "sym": spec.sym,
        "true_sequential": true_sequential, "model_name_or_path": None, "model_file_base_name": "model",
    }


def _work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.qvlq-work"


def _save_block(work: Path, i: int, tensors: dict[str, torch.Tensor], logs: list[ModuleLog]) -> None:
    tmp = work / f".block_{i:04d}.tmp"
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    (work / f"block_{i:04d}.json").write_text(json.dumps([asdict(m) for m in logs], indent=1))
    os.replace(tmp, work / f"block_{i:04d}.safetensors")  # the .safetensors marks the block as done


def quantize(
    model_dir: str | Path,
    calibration: Any,
    out: str | Path,
    spec: QuantSpec | None = None,
    *,
    true_sequential: bool = True,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    resume: bool = False,
    adapter: str | Path | None = None,
    offload: str = "auto",
    method: str = "gptq",
    on_event: Event | None = None,
) -> QuantizeResult:
    """Quantize the Qwen-VL checkpoint in `model_dir` with `calibration` (a qvlq.calibrate
    CalibrationSet) and write an official-layout Int4 directory to `out` (atomically).
    method "rtn" writes the round-to-nearest baseline in the same format (losses on the same Hessians)."""
    if method not in ("gptq", "rtn"):
        raise ValueError(f"unknown method {method!r} (gptq or rtn)")
    t_start = time.perf_counter()
    spec = spec or QuantSpec()
    emit = on_event or (lambda *a, **k: None)
    src = resolve_model_dir(model_dir)
    out = Path(out)
    config = read_config(src)
    validate_request(config, spec)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    samples = list(calibration.samples)
    if not samples:
        raise ValueError("empty calibration set")
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cdtype = _compute_dtype(dev)
    lora = LoraAdapter(adapter) if adapter else None
    reader = WeightReader(src, lora)
    n_blocks = config.num_hidden_layers
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        torch.backends.cuda.matmul.allow_tf32 = False  # determinism across runs and resume
        torch.backends.cudnn.allow_tf32 = False

    fingerprint = _fingerprint(
        (src / "config.json").read_text(), sorted(reader.where), asdict(spec), true_sequential, str(dev.type),
        str(cdtype), lora.fingerprint() if lora else None, method,
        # CPU BLAS sums in a thread-count-dependent order: another count gives other (valid) bytes, so
        # resuming with it could not match an uninterrupted run
        torch.get_num_threads() if dev.type == "cpu" else None,
        *[t for s in samples for t in (s.input_ids, s.pixels) if t is not None],
    )
    work = _work_dir(out)
    state = work / "state.json"
    if resume and work.exists():
        if not state.is_file() or json.loads(state.read_text()).get("fingerprint") != fingerprint:
            raise ValueError(
                f"{work} belongs to a different run (model, calibration, options or CPU thread count differ)"
            )
    else:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        write_json(state, {"fingerprint": fingerprint, "source": str(src)})  # atomic: a kill cannot truncate it

    result = QuantizeResult(
        out=str(out), source=str(src), spec=asdict(spec) | {"true_sequential": true_sequential, "method": method},
        device=str(dev), compute_dtype=str(cdtype).removeprefix("torch."), n_blocks=n_blocks,
        calibration=asdict(calibration.stats) if hasattr(calibration, "stats") else {},
    )

    with torch.device("meta"):
        model = QWenLMHeadModel(config)
    model.eval()

    # 1. layer-0 inputs through the real embedding + vision path
    has_images = any(s.pixels is not None for s in samples)
    reader.load_module(model.transformer.wte, "transformer.wte.", dev, cdtype)
    if has_images:
        reader.load_module(model.transformer.visual, "transformer.visual.", dev, cdtype)
    n_tokens = sum(int(s.input_ids.numel()) for s in samples)
    act_bytes = n_tokens * config.hidden_size * torch.empty((), dtype=cdtype).element_size()
    store = dev
    if offload == "cpu" or (offload == "auto" and dev.type == "cuda"
                            and 2.5 * act_bytes > torch.cuda.mem_get_info(dev)[0] * 0.6):
        store = torch.device("cpu")
    emit("start", estimate=estimate_seconds(config, n_tokens, dev), n_samples=len(samples), n_tokens=n_tokens,
         n_blocks=n_blocks, store=str(store))
    acts: list[torch.Tensor] = []
    with torch.inference_mode():
        for j, s in enumerate(samples):
            ids = s.input_ids.to(dev)[None]
            pix = s.pixels.to(dev) if s.pixels is not None else None
            acts.append(model.transformer.embed(ids, images=pix).to(store))
            emit("capture", done=j + 1, total=len(samples))
    model.transformer.wte = nn.Embedding(1, 1, device="meta")
    model.transformer.visual = nn.Identity()
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    # 2-4. block by block
    for i in range(n_blocks):
        block = model.transformer.h[i]
        prefix = f"transformer.h.{i}."
        reader.load_module(block, prefix, dev, cdtype)
        done = work / f"block_{i:04d}.safetensors"
        if done.is_file():
            saved = load_file(str(done), device=str(dev))
            for name in QUANTIZED_LINEARS:
                lin = _submodule(block, name)
                p = f"{prefix}{name}."
                lin.weight.data = dequantize_gptq_v1(
                    saved[p + "qweight"], saved[p + "qzeros"], saved[p + "scales"], saved[p + "g_idx"],
                    spec.bits, cdtype,
                )
            result.modules += [ModuleLog(**m) for m in json.loads((work / f"block_{i:04d}.json").read_text())]
            result.resumed_blocks += 1
            emit("block_resumed", block=i)
        else:
            tensors, logs = _quantize_block(block, model, i, acts, spec, true_sequential, dev, cdtype, emit, method)
            tensors[f"{prefix}ln_1.weight"] = block.ln_1.weight.detach().to(torch.float16)
            tensors[f"{prefix}ln_2.weight"] = block.ln_2.weight.detach().to(torch.float16)
            _save_block(work, i, tensors, logs)
            result.modules += logs
        with torch.inference_mode():
            for j, h in enumerate(acts):
                acts[j] = _block_forward(block, model, h.to(dev)).to(store)
        model.transformer.h[i] = nn.Identity()  # free the block
        emit("block_done", block=i, total=n_blocks)
    del acts

    # 5. assemble the drop-in Int4 directory
    emit("write", out=str(out))
    try:
        _write_output(src, out, config, reader, work, spec, true_sequential, overwrite, result)
    except OSError as e:
        raise OSError(f"writing {out} failed ({e}); the finished blocks are kept in {work}: rerun with --resume") from e
    shutil.rmtree(work, ignore_errors=True)
    result.seconds = time.perf_counter() - t_start
    if dev.type == "cuda":
        result.peak_device_bytes = int(torch.cuda.max_memory_allocated(dev))
    result.peak_rss_bytes = _peak_rss_bytes()
    return result


def _peak_rss_bytes() -> int:
    """The process's peak resident set so far (psutil's rss is only the current one)."""
    try:
        import resource
    except ImportError:  # Windows: peak working set
        info = psutil.Process().memory_info()
        return int(getattr(info, "peak_wset", info.rss))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def _quantize_block(
    block: nn.Module,
    model: QWenLMHeadModel,
    i: int,
    acts: list[torch.Tensor],
    spec: QuantSpec,
    true_sequential: bool,
    dev: torch.device,
    cdtype: torch.dtype,
    emit: Event,
    method: str = "gptq",
) -> tuple[dict[str, torch.Tensor], list[ModuleLog]]:
    groups = SEQUENTIAL_GROUPS if true_sequential else [sum(SEQUENTIAL_GROUPS, [])]
    tensors: dict[str, torch.Tensor] = {}
    logs: list[ModuleLog] = []
    for group in groups:
        mods = {name: _submodule(block, name) for name in group}
        gptqs = {name: GPTQ(m, device=dev) for name, m in mods.items()}
        pending: set[str] = set()
        handles = [m.register_forward_pre_hook(_collector(gptqs[n], n, pending)) for n, m in mods.items()]
        try:
            with torch.inference_mode():
                for h in acts:
                    pending.update(group)
                    try:
                        _block_forward(block, model, h.to(dev))
                    except _Stop:
                        pass
        finally:
            for hd in handles:
                hd.remove()
        for name, m in mods.items():
            if method == "rtn":
                res = round_to_nearest(m.weight.data, spec, gptqs[name].H)
                res.n_samples = gptqs[name].n_samples
            else:
                res = gptqs[name].quantize(m.weight.data, spec)
            entries = quantized_state_dict_entries(f"transformer.h.{i}.{name}", res, m.bias)
            tensors.update(entries)
            p = f"transformer.h.{i}.{name}."
            # later groups and the next block see exactly the weights a loader will reconstruct
            m.weight.data = dequantize_gptq_v1(
                entries[p + "qweight"], entries[p + "qzeros"], entries[p + "scales"], entries[p + "g_idx"],
                spec.bits, cdtype,
            )
            log = ModuleLog(i, name, res.loss, res.rtn_loss, res.n_samples, res.damp, res.seconds)
            logs.append(log)
            emit("module", **asdict(log))
    return tensors, logs


def _collector(gptq: GPTQ, name: str, pending: set[str]) -> Callable:
    """Pre-hook feeding a module's inputs to its GPTQ; stops the forward once the group is fed."""

    def fn(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        gptq.add_batch(inputs[0])
        pending.discard(name)
        if not pending:
            raise _Stop

    return fn


def _output_order(reader: WeightReader, n_blocks: int) -> list[str]:
    """Blocks first (in order), then the untouched float tensors, lm_head last (as the official shards)."""
    rest = [n for n in reader.names() if not n.startswith("transformer.h.")]
    rest.sort(key=lambda n: (n == "lm_head.weight", n))
    return rest


def _write_output(
    src: Path,
    out: Path,
    config: QWenConfig,
    reader: WeightReader,
    work: Path,
    spec: QuantSpec,
    true_sequential: bool,
    overwrite: bool,
    result: QuantizeResult,
) -> None:
    n_blocks = config.num_hidden_layers
    block_files = [work / f"block_{i:04d}.safetensors" for i in range(n_blocks)]
    sizes: dict[str, int] = {}
    where: dict[str, Path | None] = {}
    for f in block_files:
        with safe_open(str(f), "pt") as sf:
            for k in sorted(sf.keys()):
                sl = sf.get_slice(k)
                shape, dtype = sl.get_shape(), sl.get_dtype()
                sizes[k] = int(torch.Size(shape).numel()) * (2 if dtype == "F16" else 4)
                where[k] = f
    float_names = _output_order(reader, n_blocks)
    for k in float_names:
        with safe_open(str(reader.where[k]), "pt") as sf:
            sizes[k] = int(torch.Size(sf.get_slice(k).get_shape()).numel()) * 2
        where[k] = None
    shards = plan_shards(sizes, MAX_SHARD_BYTES)

    def tensors() -> Iterator[dict[str, torch.Tensor]]:
        cache: dict[Path, dict[str, torch.Tensor]] = {}
        for names in shards:
            part = {}
            for k in names:
                f = where[k]
                if f is None:
                    part[k] = reader.get(k, "cpu", torch.float16)
                else:
                    if f not in cache:
                        cache.clear()
                        cache[f] = load_file(str(f))
                    part[k] = cache[f][k]
            yield part

    qc = _official_quant_config(spec, true_sequential)
    cfg = config.to_official_dict("float16")
    cfg.update(bf16=False, fp16=True, fp32=False, quantization_config=qc | {"quant_method": "gptq"})
    with atomic_dir(out, overwrite) as tmp:
        write_shards(tmp, tensors(), len(shards))
        write_json(tmp / "config.json", dict(sorted(cfg.items())))
        write_json(tmp / "quantize_config.json", qc)
        gen = src / "generation_config.json"
        if gen.is_file():
            shutil.copyfile(gen, tmp / "generation_config.json")
        for pattern in ("*.tiktoken", "tokenizer_config.json", "*.py"):  # *.py copied for old-stack users only
            for f in sorted(src.glob(pattern)):
                shutil.copyfile(f, tmp / f.name)
        write_json(tmp / "quantize_log.json", _log_json(result))


def _log_json(result: QuantizeResult) -> dict[str, Any]:
    """The per-module log without wall times, so resumed and uninterrupted runs write the same bytes."""
    d = asdict(result)
    d["modules"] = [{k: v for k, v in m.items() if k != "seconds"} for m in d["modules"]]
    for k in ("seconds", "peak_device_bytes", "peak_rss_bytes", "resumed_blocks", "out", "source"):
        d.pop(k, None)
    return d
