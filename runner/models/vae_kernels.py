"""The VAE decoder's output layer and its Bernoulli log-likelihood as one op (issue 28, item 1).

    loglik[n] = sum_p x[n % B, p] * l[n, p] - softplus(l[n, p]),    l = h @ W^T + b

At IWAE k=50, batch 20, the logits l are a (k x B) x 784 matrix per job that the eager model
writes, reads back for softplus, and writes again as its gradient. Here the forward kernel
computes l tile by tile in registers and keeps only the row sums; the backward recomputes the
tiles, so that dl = g * (x - sigmoid(l)) never reaches memory either, in two kernels: one over
row tiles for dh = dl @ W, one over pixel tiles for dW = dl^T @ h and db = sum_n dl (two
reductions along different axes, so neither kernel needs atomics and both are deterministic).

The op is a ``torch.library.custom_op`` on a leading jobs dimension, h [J, N, H], W [J, P, H],
b [J, P], x [J, B, P] -> [J, N]: eagerly J = 1; under ``torch.func.vmap`` (a fused group,
runner/engine/fused.py) the vmap rule folds the vmapped dimension into J, so the group runs ONE
launch per kernel with the jobs as a grid dimension. ``torch.compile`` sees it as an opaque op
(``register_fake`` gives its shapes) and a CUDA graph captures its launches (no host reads).
Gradients come from ordinary autograd, outside any vmap (as the fused engine takes them):
PyTorch's custom ops do not support torch.func.grad, so the backward op has no vmap rule.

``output_loglik`` is the model's entry point: it runs the Triton kernels where they can run and
the eager reference (``output_loglik_reference``) elsewhere — on CPU tensors unless
TRITON_INTERPRET=1 was set before this module was imported (Triton's interpreter, for tests),
for dtypes other than float32 (float64 models; bf16/fp16 under autocast keep autocast's own
rounding), and for hidden layers wider than MAX_HIDDEN (the whole hidden row is one tile).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: the reference runs
    triton = None

# Triton decides when a kernel is decorated whether it runs compiled or interpreted.
INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET") == "1"
MAX_HIDDEN = 256  # h's row is one register tile of the next power of two
log = logging.getLogger(__name__)


def output_loglik_reference(h: Tensor, weight: Tensor, bias: Tensor, x: Tensor) -> Tensor:
    """The eager model's computation (runner/models/vae.py): logits materialised, then the
    stable Bernoulli log-likelihood summed over pixels. h [..., B, H], x [B, P] -> [..., B]."""
    logits = F.linear(h, weight, bias)
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return (x * logits - F.softplus(logits)).sum(-1)


def why_not_triton(h: Tensor, weight: Tensor) -> str | None:
    """Why the kernels cannot run on these tensors (see the module docstring), or None."""
    if triton is None:
        return "triton is not installed"
    if h.dtype != torch.float32 or weight.dtype != torch.float32:
        return f"{str(h.dtype).removeprefix('torch.')} activations, {str(weight.dtype).removeprefix('torch.')} weights"
    if h.shape[-1] > MAX_HIDDEN:
        return f"{h.shape[-1]} hidden units (at most {MAX_HIDDEN})"
    if not INTERPRETED and not (h.is_cuda and weight.is_cuda):
        return f"{h.device.type} tensors without TRITON_INTERPRET=1"
    return None


def output_loglik(h: Tensor, weight: Tensor, bias: Tensor, x: Tensor) -> Tensor:
    """log Bernoulli(x; sigmoid(h @ W^T + b)) summed over pixels, without the logits in memory
    where Triton runs. h [..., B, H] (rows: the k samples of each of B data points, B fastest),
    weight [P, H], bias [P], x [B, P] (no gradient: it is data) -> [..., B]."""
    reason = why_not_triton(h, weight)
    if reason is not None:
        if not torch.compiler.is_compiling():
            _announce("the eager reference runs ({})", reason)
        return output_loglik_reference(h, weight, bias, x)
    if x.requires_grad:
        raise ValueError("output_loglik gives no gradient with respect to x (the binarised pixels)")
    if h.shape[-2] != x.shape[-2] or weight.shape[-1] != h.shape[-1] or x.shape[-1] != weight.shape[-2]:
        raise ValueError(f"output_loglik: h {tuple(h.shape)}, weight {tuple(weight.shape)} and x {tuple(x.shape)} "
                         "do not fit h [..., B, H], weight [P, H], x [B, P]")
    rows = h.shape[:-1]
    out = torch.ops.runner.bernoulli_output_loglik(h.reshape(1, -1, h.shape[-1]), weight.unsqueeze(0),
                                                   bias.unsqueeze(0), x.to(h.dtype).unsqueeze(0))
    return out.reshape(rows)


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tile sizes and launch settings of the three kernels. Each tile side is a power of two
    >= 16 (tl.dot's smallest); h's whole hidden row is one tile (BLOCK_H)."""

    rows: int = 32  # forward and dh: rows of h per program
    pixels: int = 32  # forward: pixels per inner step
    dh_pixels: int = 16  # dh: pixels per inner step
    dw_pixels: int = 32  # dW: pixels per program
    dw_rows: int = 32  # dW: rows per inner step
    num_warps: int = 8
    num_stages: int = 2


# benchmarks/iwae_kernels.py --tune sets other tiles here; None: chosen by ``tiles_for``.
TILES: Tiles | None = None
# Under the interpreter each tile operation is a NumPy call (its tl.dot a slow non-BLAS one): few
# large tiles over the pixels, row tiles no larger than the rows (the padding is computed too).
INTERPRETER_TILES = Tiles(rows=64, pixels=128, dh_pixels=128, dw_pixels=128, dw_rows=64, num_warps=1, num_stages=1)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def tiles_for(jobs: int, n: int, pixels: int, precision: str, sms: int) -> Tiles:
    """Each forward/dh program reads all of W from L2 and each dW program all of h: the largest
    tiles (fewest re-reads) whose programs still fill every SM. Compiled offline for sm_90
    (``benchmarks/iwae_kernels.py --resources``), these use at most ~220 registers a thread with
    8 warps and spill none; with 4 warps, or 64-row tiles of full-precision (FMA) products, some
    spill."""
    if TILES is not None:
        return TILES
    if INTERPRETED:
        rows = min(INTERPRETER_TILES.rows, max(16, triton.next_power_of_2(n)))
        return dataclasses.replace(INTERPRETER_TILES, rows=rows, dw_rows=rows)
    largest = 64 if precision == "tf32" else 32
    rows = next((r for r in (64, 32) if r <= largest and jobs * triton.cdiv(n, r) >= sms), 16)
    dw_pixels = 32 if jobs * triton.cdiv(pixels, 32) >= sms else 16
    return Tiles(rows=rows, dh_pixels=32 if rows == 16 else 16, dw_pixels=dw_pixels)


def _precision(h: Tensor) -> str:
    """tl.dot's input precision: TF32 where the run allows it for matrix products
    (trainer.precision=tf32; evaluation turns it off), else full precision like cuBLAS's."""
    return "tf32" if h.dtype == torch.float32 and h.is_cuda and torch.backends.cuda.matmul.allow_tf32 else "ieee"


_announced: set[tuple] = set()


def _announce(path: str, *detail) -> None:
    """Say once per kind of call which path runs (a run's log shows what model.fused_output did)."""
    key = (path, *detail)
    if key not in _announced:
        _announced.add(key)
        log.info("model.fused_output: %s", path.format(*detail))


if triton is not None:

    @triton.jit
    def _logits_tile(h, w_t, bias_ptr, offsets, pixel_ok, PRECISION: tl.constexpr):
        """l = h @ W^T + b for one tile: h [rows, H], w_t [H, pixels] (already loaded)."""
        bias = tl.load(bias_ptr + offsets, mask=pixel_ok, other=0.0)
        return tl.dot(h, w_t, input_precision=PRECISION) + bias[None, :]

    @triton.jit
    def _forward_kernel(h_ptr, w_ptr, b_ptr, x_ptr, out_ptr, N, P, H, B,
                        s_hj, s_hn, s_hh, s_wj, s_wp, s_wh, s_bj, s_bp, s_xj, s_xb, s_xp, s_oj,
                        BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr,
                        PRECISION: tl.constexpr):
        job = tl.program_id(1).to(tl.int64)  # 64-bit offsets: evaluation's k=5000 rows get large
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        hidden = tl.arange(0, BLOCK_H)
        row_ok, hidden_ok = rows < N, hidden < H
        h = tl.load(h_ptr + job * s_hj + rows[:, None] * s_hn + hidden[None, :] * s_hh,
                    mask=row_ok[:, None] & hidden_ok[None, :], other=0.0)
        x_rows = x_ptr + job * s_xj + (rows % B)[:, None] * s_xb  # row n is data point n % B
        total = tl.zeros([BLOCK_N], dtype=h.dtype)
        for p0 in range(0, P, BLOCK_P):
            pixels = p0 + tl.arange(0, BLOCK_P)
            pixel_ok = pixels < P
            w_t = tl.load(w_ptr + job * s_wj + hidden[:, None] * s_wh + pixels[None, :] * s_wp,
                          mask=hidden_ok[:, None] & pixel_ok[None, :], other=0.0)
            logits = _logits_tile(h, w_t, b_ptr + job * s_bj, pixels * s_bp, pixel_ok, PRECISION)
            x = tl.load(x_rows + pixels[None, :] * s_xp, mask=row_ok[:, None] & pixel_ok[None, :], other=0.0)
            # softplus(l) = max(l, 0) + log(1 + exp(-|l|)): no overflow for any l
            term = x * logits - tl.maximum(logits, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(logits)))
            total += tl.sum(tl.where(pixel_ok[None, :], term, 0.0), axis=1)
        tl.store(out_ptr + job * s_oj + rows, total, mask=row_ok)

    @triton.jit
    def _dlogits_tile(logits, x, g):
        """g * (x - sigmoid(l)), sigmoid written from exp(-|l|) so that it never overflows."""
        e = tl.exp(-tl.abs(logits))
        sigmoid = tl.where(logits >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        return g[:, None] * (x - sigmoid)

    @triton.jit
    def _dh_kernel(g_ptr, h_ptr, w_ptr, b_ptr, x_ptr, dh_ptr, N, P, H, B,
                   s_gj, s_gn, s_hj, s_hn, s_hh, s_wj, s_wp, s_wh, s_bj, s_bp, s_xj, s_xb, s_xp,
                   s_dj, s_dn, s_dh,
                   BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_H: tl.constexpr,
                   PRECISION: tl.constexpr):
        """dh = dl @ W over one tile of rows, dl recomputed pixel tile by pixel tile."""
        job = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        hidden = tl.arange(0, BLOCK_H)
        row_ok, hidden_ok = rows < N, hidden < H
        h = tl.load(h_ptr + job * s_hj + rows[:, None] * s_hn + hidden[None, :] * s_hh,
                    mask=row_ok[:, None] & hidden_ok[None, :], other=0.0)
        g = tl.load(g_ptr + job * s_gj + rows * s_gn, mask=row_ok, other=0.0)  # rows past N: g = 0, dl = 0
        x_rows = x_ptr + job * s_xj + (rows % B)[:, None] * s_xb
        dh = tl.zeros([BLOCK_N, BLOCK_H], dtype=h.dtype)
        for p0 in range(0, P, BLOCK_P):
            pixels = p0 + tl.arange(0, BLOCK_P)
            pixel_ok = pixels < P
            # W's rows past P load as zeros: their dl (not zero) meets a zero weight in dh.
            w_t = tl.load(w_ptr + job * s_wj + hidden[:, None] * s_wh + pixels[None, :] * s_wp,
                          mask=hidden_ok[:, None] & pixel_ok[None, :], other=0.0)
            logits = _logits_tile(h, w_t, b_ptr + job * s_bj, pixels * s_bp, pixel_ok, PRECISION)
            x = tl.load(x_rows + pixels[None, :] * s_xp, mask=row_ok[:, None] & pixel_ok[None, :], other=0.0)
            dl = _dlogits_tile(logits, x, g)
            dh += tl.dot(dl, tl.trans(w_t), input_precision=PRECISION)
        tl.store(dh_ptr + job * s_dj + rows[:, None] * s_dn + hidden[None, :] * s_dh, dh,
                 mask=row_ok[:, None] & hidden_ok[None, :])

    @triton.jit
    def _dw_kernel(g_ptr, h_ptr, w_ptr, b_ptr, x_ptr, dw_ptr, db_ptr, N, P, H, B,
                   s_gj, s_gn, s_hj, s_hn, s_hh, s_wj, s_wp, s_wh, s_bj, s_bp, s_xj, s_xb, s_xp,
                   s_dwj, s_dwp, s_dwh, s_dbj, s_dbp,
                   BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
                   PRECISION: tl.constexpr):
        """dW = dl^T @ h and db = sum_n dl over one tile of pixels, dl recomputed row tile by row tile."""
        job = tl.program_id(1).to(tl.int64)
        pixels = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        hidden = tl.arange(0, BLOCK_H)
        pixel_ok, hidden_ok = pixels < P, hidden < H
        w_t = tl.load(w_ptr + job * s_wj + hidden[:, None] * s_wh + pixels[None, :] * s_wp,
                      mask=hidden_ok[:, None] & pixel_ok[None, :], other=0.0)
        dw = tl.zeros([BLOCK_P, BLOCK_H], dtype=w_t.dtype)
        db = tl.zeros([BLOCK_P], dtype=w_t.dtype)
        for n0 in range(0, N, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            row_ok = rows < N
            h = tl.load(h_ptr + job * s_hj + rows[:, None] * s_hn + hidden[None, :] * s_hh,
                        mask=row_ok[:, None] & hidden_ok[None, :], other=0.0)
            g = tl.load(g_ptr + job * s_gj + rows * s_gn, mask=row_ok, other=0.0)  # rows past N add nothing
            logits = _logits_tile(h, w_t, b_ptr + job * s_bj, pixels * s_bp, pixel_ok, PRECISION)
            x = tl.load(x_ptr + job * s_xj + (rows % B)[:, None] * s_xb + pixels[None, :] * s_xp,
                        mask=row_ok[:, None] & pixel_ok[None, :], other=0.0)
            dl = _dlogits_tile(logits, x, g)
            dw += tl.dot(tl.trans(dl), h, input_precision=PRECISION)
            db += tl.sum(dl, axis=0)
        tl.store(dw_ptr + job * s_dwj + pixels[:, None] * s_dwp + hidden[None, :] * s_dwh, dw,
                 mask=pixel_ok[:, None] & hidden_ok[None, :])
        tl.store(db_ptr + job * s_dbj + pixels * s_dbp, db, mask=pixel_ok)


def _sizes(h: Tensor, weight: Tensor, x: Tensor) -> tuple[int, int, int, int, int]:
    (jobs, n, hidden), pixels, batch = h.shape, weight.shape[1], x.shape[1]
    return jobs, n, pixels, hidden, batch


def _block_h(hidden: int) -> int:
    return max(16, triton.next_power_of_2(hidden))


@torch.library.custom_op("runner::bernoulli_output_loglik", mutates_args=())
def bernoulli_output_loglik(h: Tensor, weight: Tensor, bias: Tensor, x: Tensor) -> Tensor:
    """h [J, N, H], weight [J, P, H], bias [J, P], x [J, B, P] (B divides N) -> loglik [J, N]."""
    jobs, n, pixels, hidden, batch = _sizes(h, weight, x)
    out = h.new_empty(jobs, n)
    precision = _precision(h)
    tiles = tiles_for(jobs, n, pixels, precision, _sm_count(h.device))
    _announce("Triton kernels {}, {} job(s) per launch", "in Triton's interpreter" if INTERPRETED else "on the GPU", jobs)
    _forward_kernel[(triton.cdiv(n, tiles.rows), jobs)](
        h, weight, bias, x, out, n, pixels, hidden, batch, *h.stride(), *weight.stride(), *bias.stride(),
        *x.stride(), out.stride(0), BLOCK_N=tiles.rows, BLOCK_P=tiles.pixels, BLOCK_H=_block_h(hidden),
        PRECISION=precision, num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return out


@bernoulli_output_loglik.register_fake
def _(h, weight, bias, x):
    return h.new_empty(h.shape[0], h.shape[1])


@torch.library.custom_op("runner::bernoulli_output_loglik_backward", mutates_args=())
def bernoulli_output_loglik_backward(grad: Tensor, h: Tensor, weight: Tensor, bias: Tensor,
                                     x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dh, dW, db) of sum_n grad[j, n] * loglik[j, n], logits recomputed in tiles."""
    jobs, n, pixels, hidden, batch = _sizes(h, weight, x)
    dh = torch.empty_like(h, memory_format=torch.contiguous_format)
    # A weight shared by all jobs (expanded, stride 0) still gets one gradient per job: autograd
    # sums them through the expand.
    dw = weight.new_empty(jobs, pixels, hidden)
    db = bias.new_empty(jobs, pixels)
    precision, block_h = _precision(h), _block_h(hidden)
    tiles = tiles_for(jobs, n, pixels, precision, _sm_count(h.device))
    shared = (n, pixels, hidden, batch, *grad.stride(), *h.stride(), *weight.stride(), *bias.stride(), *x.stride())
    _dh_kernel[(triton.cdiv(n, tiles.rows), jobs)](
        grad, h, weight, bias, x, dh, *shared, *dh.stride(), BLOCK_N=tiles.rows, BLOCK_P=tiles.dh_pixels,
        BLOCK_H=block_h, PRECISION=precision, num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    _dw_kernel[(triton.cdiv(pixels, tiles.dw_pixels), jobs)](
        grad, h, weight, bias, x, dw, db, *shared, *dw.stride(), *db.stride(), BLOCK_P=tiles.dw_pixels,
        BLOCK_N=tiles.dw_rows, BLOCK_H=block_h, PRECISION=precision, num_warps=tiles.num_warps,
        num_stages=tiles.num_stages)
    return dh, dw, db


@bernoulli_output_loglik_backward.register_fake
def _(grad, h, weight, bias, x):
    jobs, _, pixels, hidden, _ = _sizes(h, weight, x)
    return torch.empty_like(h, memory_format=torch.contiguous_format), weight.new_empty(jobs, pixels, hidden), \
        bias.new_empty(jobs, pixels)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    h, weight, bias, x = ctx.saved_tensors
    dh, dw, db = bernoulli_output_loglik_backward(grad, h, weight, bias, x)
    return dh, dw, db, None  # x is data


torch.library.register_autograd("runner::bernoulli_output_loglik", _backward, setup_context=_setup_context)


def _jobs_first(args: tuple[Tensor, ...], in_dims: tuple[int | None, ...], size: int) -> list[Tensor]:
    """Each argument with the vmapped dimension first (expanded, stride 0, where it has none) and
    folded into the op's jobs dimension: [V, J, ...] -> [V * J, ...]."""
    out = []
    for arg, dim in zip(args, in_dims):
        arg = arg.movedim(dim, 0) if dim is not None else arg.expand(size, *arg.shape)
        out.append(arg.reshape(size * arg.shape[1], *arg.shape[2:]))
    return out


@torch.library.register_vmap("runner::bernoulli_output_loglik")
def _(info, in_dims, h, weight, bias, x):
    out = bernoulli_output_loglik(*_jobs_first((h, weight, bias, x), in_dims, info.batch_size))
    return out.reshape(info.batch_size, -1, out.shape[-1]), 0
