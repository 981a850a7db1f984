"""GPTQ (Frantar et al., 2022, arXiv:2210.17323), written from the paper's equations.

For one linear layer with weight W [out, in] and calibration inputs X, GPTQ minimises the layer's
output error ||W X - Q X||^2 one input column at a time. Its second-order objective is governed by
the Hessian H = 2 X X^T / n. When column q is rounded, the Optimal Brain Surgeon update (eq. 3)
moves the columns that are not quantized yet so they absorb the error:

    delta_F = -(w_q - quant(w_q)) / [H_F^-1]_qq * (H_F^-1)_{:,q}

Two tricks from the paper make this fast. First, with a fixed column order, each row of the upper
Cholesky factor U of H^-1 already holds the [H_F^-1] rows needed, so err = (w - q) / U_qq and the
update is err * U[q, q:]. Second, updates are lazily batched: inside a block of B columns they are
applied immediately, and the rest of W is updated once per block with one matrix product.

Layout: we work on W^T ([in, out]), so that "column i of W" is a contiguous row. Codes, scales and
g_idx come back in AutoGPTQ's conventions (see qvlq.int4 for the on-disk packing). Everything runs on
the Hessian's device (the layer's, by default).

Choices, where the paper leaves room:
- Dead inputs (diag H == 0) get H_ii = 1 and W[:, i] = 0. Damping is damp_percent * mean(diag H); if
  a Cholesky factorisation fails, damp_percent is doubled (up to 1) and QuantResult.damp records it.
- Scales are rounded to fp16 before any code is computed, since fp16 is what the checkpoint stores:
  QuantResult.dequant() is then exactly what a loader reconstructs.
- Without static_groups, a group's scale/zero is fixed when GPTQ reaches its first column, from the
  group's weights as updated so far (this block's pending updates included, so a group may start
  mid-block or span blocks: AutoGPTQ reads those columns before the in-block updates; the two agree
  whenever groups start at block starts, as in the official g128 / block 128 setting).
- act_group_aware (GAR, off by default): the processing order of group_aware_order(); scales/zeros
  are set per group when GPTQ reaches it, as without act-order. The output is the desc_act=false
  format (g_idx = i // group_size), so any loader and kernel of the official Int4 reads it.
- desc_act: columns are processed by decreasing diag(H). Without static_groups, groups are runs of
  group_size columns in that processing order, like AutoGPTQ, so g_idx[i] = (rank of i) // group_size
  and is not monotonic. With static_groups, all scales/zeros come up front from the unmodified weight
  in the original order and g_idx[i] = i // group_size, whatever the processing order.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

FP16_MAX = 65504.0
FP16_MIN_SUBNORMAL = 2.0**-24


@dataclass
class QuantSpec:
    """How to quantize one layer. Defaults = the official Qwen-VL-Chat-Int4 configuration."""

    bits: int = 4
    group_size: int = 128  # -1: one group spanning all input columns (per-channel)
    sym: bool = True
    desc_act: bool = False  # "act-order": process columns by decreasing diag(H)
    static_groups: bool = False  # compute every group's scale/zero up front from the unmodified W
    # Group-aware reordering (GAR): act-order within each group, groups by their largest diag(H); the
    # groups stay contiguous, so g_idx stays i // group_size and the files are plain desc_act=false.
    act_group_aware: bool = False
    damp_percent: float = 0.01
    block_size: int = 128

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def validate(self, in_features: int | None = None, out_features: int | None = None) -> None:
        """Raise ValueError on anything GPTQ or the v1 packing cannot do."""
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"bits must be 2, 3, 4 or 8, got {self.bits}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be -1 or a positive integer, got {self.group_size}")
        if not 0.0 < self.damp_percent <= 1.0:
            raise ValueError(f"damp_percent must be in (0, 1], got {self.damp_percent}")
        if self.act_group_aware and (self.desc_act or self.group_size == -1):
            raise ValueError("act_group_aware needs desc_act false and a group_size (it reorders within groups)")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")
        # int32 words hold a whole number of codes every `pack` values (8 for 4 bit, 32 for 3 bit).
        pack = 32 // math.gcd(32, self.bits)
        if in_features is not None:
            if self.group_size != -1 and in_features % self.group_size:
                raise ValueError(f"group_size {self.group_size} does not divide in_features {in_features}")
            if in_features % pack:
                raise ValueError(
                    f"in_features {in_features} is not a multiple of {pack}, needed to pack {self.bits}-bit codes"
                )
        if out_features is not None and out_features % pack:
            raise ValueError(
                f"out_features {out_features} is not a multiple of {pack}, needed to pack {self.bits}-bit zeros"
            )


@dataclass
class QuantResult:
    """Quantized layer: W'[o, i] = scales[g, o] * (codes[o, i] - zeros[g, o]) with g = g_idx[i].

    loss and rtn_loss are the same metric, the proxy loss tr((W - W') H (W - W')^T) on the undamped
    Hessian, i.e. 2 * mean over calibration rows x of ||(W - W') x||^2. rtn_loss is round-to-nearest
    with the same g_idx groups, its scale/zero taken from the unmodified W.
    """

    codes: Tensor  # uint8 [out, in], values in [0, 2^bits - 1], original column order
    scales: Tensor  # float32 [n_groups, out], every value exactly representable in fp16
    zeros: Tensor  # int32 [n_groups, out], the real zero point (8 for symmetric 4 bit)
    g_idx: Tensor  # int32 [in]
    bits: int
    group_size: int
    loss: float
    rtn_loss: float
    damp: float  # damp_percent actually used (larger than asked if Cholesky needed a retry)
    seconds: float
    n_samples: int

    def dequant(self, dtype: torch.dtype = torch.float32) -> Tensor:
        g = self.g_idx.long()
        w = (self.codes.float() - self.zeros[g].T.float()) * self.scales[g].T
        return w.to(dtype)


def _scale_zero(x: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Scale and zero per output channel from rows x [..., rows, out] (reduced over dim -2)."""
    xmin = x.amin(-2).clamp(max=0)  # the grid always contains 0, so zeroed (dead) weights stay exact
    xmax = x.amax(-2).clamp(min=0)
    if spec.sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    flat = xmax == xmin  # all-zero group: any scale works, pick one that is not 0
    xmin = torch.where(flat, -1.0, xmin)
    xmax = torch.where(flat, 1.0, xmax)
    scale = (xmax - xmin) / spec.maxq
    if not spec.sym:
        # GPTQ v1 stores zero-1 in `bits` unsigned bits, so a zero point of 0 cannot be written (it
        # would read back as 2^bits). Where a group has (almost) no negative weights, use zero 1 and
        # stretch the scale so that xmax still lands on the grid: one level fewer for that group.
        low = torch.round(-xmin / scale) < 1
        scale = torch.where(low, xmax / (spec.maxq - 1), scale)
    # The checkpoint stores fp16 scales; quantize with exactly those, so dequant() == checkpoint.
    scale = scale.clamp(FP16_MIN_SUBNORMAL, FP16_MAX).half().float()
    if spec.sym:
        zero = torch.full_like(scale, (spec.maxq + 1) / 2)
    else:
        zero = torch.round(-xmin / scale).clamp(1, spec.maxq)
    return scale, zero


def _quant(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def _grouped_params(wt: Tensor, g_idx: Tensor, n_groups: int, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Scale/zero [n_groups, out] of W^T rows grouped by g_idx (every group has the same size)."""
    order = torch.argsort(g_idx, stable=True)
    return _scale_zero(wt[order].reshape(n_groups, -1, wt.shape[1]), spec)


def group_aware_order(diag: Tensor, group_size: int) -> Tensor:
    """GAR processing order (Gafni et al., CVPRW 2025, arXiv:2505.14638): columns by decreasing diag(H)
    inside each group, groups by decreasing largest diag(H). Act-order's benefit (salient columns are
    rounded first, while the most columns remain to absorb their error) without scattering a group
    over the matrix."""
    groups = diag.reshape(-1, group_size)
    inner = torch.argsort(groups, dim=1, descending=True, stable=True)
    order = torch.argsort(groups.amax(dim=1), descending=True, stable=True)
    base = torch.arange(groups.shape[0], device=diag.device).unsqueeze(1) * group_size
    return (inner + base)[order].reshape(-1)


def proxy_loss(delta: Tensor, h: Tensor, block: int = 512) -> float:
    """tr(delta H delta^T) for delta [out, in], using the symmetry of H to halve the work."""
    total = torch.zeros((), dtype=torch.float64, device=delta.device)
    for k0 in range(0, delta.shape[1], block):
        k1 = min(k0 + block, delta.shape[1])
        dk = delta[:, k0:k1]
        total += ((dk @ h[k0:k1, k0:k1]) * dk).sum(dtype=torch.float64)
        if k0:  # off-diagonal blocks (rows < k0) appear twice
            total += 2 * ((delta[:, :k0] @ h[:k0, k0:k1]) * dk).sum(dtype=torch.float64)
    return float(total)


def round_to_nearest(weight: Tensor, spec: QuantSpec, H: Tensor | None = None) -> QuantResult:
    """The RTN baseline in the same format: contiguous groups (g_idx = i // group_size), scale/zero
    from the unmodified W. With H, `loss` (= `rtn_loss`) is the same proxy loss GPTQ reports."""
    t0 = time.perf_counter()
    out_f, in_f = weight.shape
    spec.validate(in_f)
    gs = in_f if spec.group_size == -1 else spec.group_size
    wt = weight.detach().float().T
    g_idx = torch.arange(in_f, device=wt.device) // gs
    scales, zeros = _grouped_params(wt, g_idx, in_f // gs, spec)
    g = g_idx.long()
    codes = _quant(wt, scales[g], zeros[g], spec.maxq).T.to(torch.uint8).contiguous()
    res = QuantResult(
        codes=codes, scales=scales, zeros=zeros.to(torch.int32), g_idx=g_idx.to(torch.int32), bits=spec.bits,
        group_size=spec.group_size, loss=0.0, rtn_loss=0.0, damp=0.0, seconds=0.0, n_samples=0,
    )
    if H is not None:
        res.loss = res.rtn_loss = proxy_loss(weight.detach().float() - res.dequant(), H)
    res.seconds = time.perf_counter() - t0
    return res


class GPTQ:
    """Accumulates one layer's Hessian from calibration inputs, then quantizes its weight."""

    def __init__(self, layer: nn.Linear | tuple[int, int], device: torch.device | str | None = None):
        if isinstance(layer, nn.Linear):
            self.rows, self.columns = layer.weight.shape
            device = device or layer.weight.device
        else:
            self.rows, self.columns = layer
        self.H = torch.zeros(self.columns, self.columns, dtype=torch.float32, device=device)
        self.n_samples = 0

    @torch.no_grad()
    def add_batch(self, x: Tensor) -> None:
        """x [..., in]: every row is one sample. Keeps H = (2/n) sum x x^T as a running average."""
        x = x.reshape(-1, self.columns).to(self.H.device, torch.float32)
        m = x.shape[0]
        if m == 0:
            return
        n = self.n_samples + m
        self.H.mul_(self.n_samples / n).addmm_(x.T, x, alpha=2.0 / n)
        self.n_samples = n

    @torch.no_grad()
    def quantize(self, weight: Tensor, spec: QuantSpec | None = None) -> QuantResult:
        spec = spec or QuantSpec()
        spec.validate(self.columns)
        if tuple(weight.shape) != (self.rows, self.columns):
            raise ValueError(f"weight shape {tuple(weight.shape)} != {(self.rows, self.columns)}")
        if self.n_samples == 0:
            raise ValueError("no calibration samples: call add_batch() first")
        t0 = time.perf_counter()
        dev, cols, maxq = self.H.device, self.columns, spec.maxq
        gs = cols if spec.group_size == -1 else spec.group_size
        n_groups = cols // gs

        w_orig = weight.detach().to(dev, torch.float32)
        wt = w_orig.T.contiguous()  # [in, out]; updated in place as GPTQ proceeds
        H = self.H.clone()
        dead = H.diagonal() == 0  # inputs that were always 0: their weights cannot matter
        H.diagonal()[dead] = 1
        wt[dead] = 0

        arange = torch.arange(cols, device=dev)
        reorder = spec.desc_act or spec.act_group_aware
        if spec.act_group_aware:
            perm = group_aware_order(H.diagonal(), gs)
        elif spec.desc_act:
            perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        else:
            perm = arange
        # Groups follow the processing order (AutoGPTQ's act-order), unless static: then they are
        # contiguous in the original order and only the processing order is permuted. Under GAR both
        # hold: every group is one run of the processing order.
        g_idx = arange // gs
        if spec.desc_act and not spec.static_groups:
            g_idx = torch.empty_like(arange).scatter_(0, perm, arange // gs)
        group_of_step = g_idx[perm].tolist()  # group used at each processing step

        if spec.static_groups:
            scales, zeros = _grouped_params(wt, g_idx, n_groups, spec)
        else:
            scales = torch.zeros(n_groups, self.rows, device=dev)
            zeros = torch.zeros(n_groups, self.rows, device=dev)
        if reorder:
            wt = wt[perm]
            H = H[perm][:, perm]

        U, damp = self._inverse_cholesky(H, spec.damp_percent)
        del H
        q_steps = torch.empty(cols, self.rows, dtype=torch.uint8, device=dev)
        bs = spec.block_size
        err = torch.empty(bs, self.rows, device=dev)
        for i1 in range(0, cols, bs):
            i2 = min(i1 + bs, cols)
            for c in range(i1, i2):
                g = group_of_step[c]
                if not spec.static_groups and c % gs == 0:
                    # Fresh group: scale/zero from the group's weights as updated so far. Rows past
                    # this block still lack this block's pending updates, so add them here.
                    ge = min(c + gs, cols)
                    rows = wt[c:ge]
                    if ge > i2:
                        rest = wt[i2:ge] - U[i1:c, i2:ge].T @ err[: c - i1]
                        rows = torch.cat([wt[c:i2], rest])
                    scales[g], zeros[g] = _scale_zero(rows, spec)
                s, z = scales[g], zeros[g]
                w = wt[c]
                q = _quant(w, s, z, maxq)
                q_steps[c] = q
                e = (w - s * (q - z)) / U[c, c]
                wt[c + 1 : i2].addr_(U[c, c + 1 : i2], e, alpha=-1)  # OBS update inside the block
                err[c - i1] = e
            wt[i2:].addmm_(U[i1:i2, i2:].T, err[: i2 - i1], alpha=-1)  # lazy batch update

        inv = torch.empty_like(perm).scatter_(0, perm, arange)
        codes = q_steps[inv].T.contiguous()  # back to original column order, [out, in]
        res = QuantResult(
            codes=codes,
            scales=scales,
            zeros=zeros.to(torch.int32),
            g_idx=g_idx.to(torch.int32),
            bits=spec.bits,
            group_size=spec.group_size,
            loss=0.0,
            rtn_loss=0.0,
            damp=damp,
            seconds=0.0,
            n_samples=self.n_samples,
        )
        res.loss = proxy_loss(w_orig - res.dequant(), self.H)

        # Round-to-nearest baseline on the same groups and the same metric.
        wt0 = w_orig.T
        rs, rz = _grouped_params(wt0, g_idx, n_groups, spec)
        g = g_idx.long()
        rtn = rs[g] * (_quant(wt0, rs[g], rz[g], maxq) - rz[g])
        res.rtn_loss = proxy_loss(w_orig - rtn.T, self.H)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        res.seconds = time.perf_counter() - t0
        return res

    @staticmethod
    def _inverse_cholesky(H: Tensor, damp_percent: float) -> tuple[Tensor, float]:
        """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; doubles damp until it works."""
        mean_diag = H.diagonal().mean()
        pct = damp_percent
        while True:
            Hd = H.clone()
            Hd.diagonal().add_(pct * mean_diag)
            L, info = torch.linalg.cholesky_ex(Hd)
            if int(info) == 0:
                U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
                if int(info) == 0:
                    return U, pct
            if pct >= 1.0:
                raise RuntimeError("Hessian is not positive definite even with damp_percent = 1")
            pct = min(2 * pct, 1.0)
