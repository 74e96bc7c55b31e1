"""Fused HARPE RoPE: q and k of one layer rotated with one base per K/V group, in one Triton launch.

The unfused path (harpe_rotary.HarpeRotaryEmbedding + megatron-core's `_apply_rotary_pos_emb_*`)
materialises an angle table [s, 1, heads_local, rot_dim] in fp32, then cos and sin of it (in the
input dtype), then rotates q and k with several element-wise kernels each. Here nothing but
scalars, `inv_freq` [G, rot_dim/2] and (packed sequences) `cu_seqlens` go in: every program
computes the positions of its tokens from its indices, the angles p * inv_freq[g, i] in fp32,
cos/sin once per (token, group, pair), and uses them for every query head of the group and for
the group's key head, for every batch entry.

    out_q, out_k = apply_harpe_rotary_qk(q, k, inv_freq, interleaved=False,
                                         cu_seqlens=None, cp_size=1, cp_rank=0, offset=0)

Layouts: "sbhd" q [s, b, hq, d], k [s, b, hk, d] (megatron's "bshd" path is really seq-first);
packed "thd" when `cu_seqlens` is given: q [t, hq, d], k [t, hk, d]. Query head h uses row
h // (hq // G) of inv_freq (G == hk). Channels rot_dim..d-1 pass through unchanged.

Positions (docs/fused_rope.md has the derivations):
- sbhd, cp_size == 1: local row i has p = offset + i.
- sbhd, cp_size > 1 (megatron's load-balanced CP: rank r holds chunks r and 2cp-1-r of 2cp):
  c = s_local / 2; p = offset + (r*c + i if i < c else (2cp-1-r)*c + (i - c)).
- thd: `cu_seqlens` are the GLOBAL padded cumulative lengths. The kernel finds each token's
  document by a binary search over cu_seqlens[j] / cp (ceil(log2(docs)) loads that hit cache;
  no per-token position vector is materialised); with L = cu[j+1]-cu[j], local index u,
  seg = L / (2cp): p = u (cp == 1), else r*seg + u if u < seg else L - seg*(r+1) + (u - seg).
  This is megatron-core's `_get_thd_freqs_on_this_cp_rank`.

Numerics. The angle is float32(p) * inv_freq[g, i] in fp32 - the same product megatron-core's
RotaryEmbedding (and HarpeRotaryEmbedding) forms, so the angles are bit-identical; cos/sin are
fp32 (on CUDA libdevice's cosf/sinf, which reduce large arguments exactly: at 128k tokens the angle
of pair 0 reaches 1.3e5 rad, where an approximate hardware sin/cos would be far off; a compile for
sm_90 shows no sin.approx/cos.approx); the rotation is done in fp32 and the result is rounded ONCE
(to nearest even) to the input dtype. megatron-core's table path casts cos/sin to the input dtype
BEFORE multiplying and rounds each product and the sum, so in bf16/fp16 the two differ by about
one ulp of the output, and the fused result is the closer to exact.
Measured on CPU (TRITON_INTERPRET=1; q/k ~ N(0, 1), |out| <= 4.6, d = 32, positions < 40; the
shapes of tests/test_fused_rope.py), max abs differences:
  fp32   fused vs unfused: forward <= 4.8e-7, q/k grads <= 4.8e-7
         vs a float64 complex reference: fused <= 2.2e-6, unfused <= 2.2e-6 (the fp32 angle)
         at positions ~131k: fused vs unfused still <= 4.8e-7; both ~7.8e-3 from exact, because
         fp32 cannot hold p * theta closer than p * 2^-24 rad (shared by both paths)
  bf16   vs float64: fused <= half a bf16 ulp of each output (7.8e-3 below |out| = 4, 1.5e-2 above);
         unfused up to 2.0e-2; fused vs unfused <= 1.6e-2 (3.1e-2 at |out| >= 4): one bf16 ulp
  fp16   vs float64: fused <= 9.8e-4 (half an ulp), unfused <= 2.7e-3; fused vs unfused <= 2.0e-3
(Under the interpreter the fp32->bf16 store is rounded to nearest even by bit arithmetic, because
the interpreter's own cast truncates; on the GPU the hardware conversion is used.)

Backward: the incoming gradients rotated by the negative angle (same kernel, sin negated), one
launch for dq and dk. inv_freq gets no gradient (it is not a parameter; a tensor that requires
grad is refused rather than silently given none).

Strides: q/k may be any views whose last dimension has stride 1 (e.g. slices of the fused QKV
projection); the kernel takes their strides. Outputs are new contiguous tensors.

Triton is imported lazily: importing this module never fails; `fused_rope_available()` says
whether the kernel can run (triton importable, and CUDA present unless TRITON_INTERPRET=1).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["apply_harpe_rotary_qk", "fused_rope_available"]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def fused_rope_available() -> bool:
    """True when the kernel can run here: triton imports and (unless TRITON_INTERPRET=1) CUDA is present."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return _interpreting() or torch.cuda.is_available()


# ----------------------------------------------------------------------------- kernel (built lazily)
_KERNEL = None
_MIN_PROGRAMS = 1024  # below this many (token block, group) programs the batch is spread over the grid too


def _autotune_configs(triton):
    if _interpreting():  # the interpreter runs every config when tuning: keep tests fast
        return [triton.Config({"BLOCK_T": 16}, num_warps=4)]
    return [
        triton.Config({"BLOCK_T": 8}, num_warps=2),
        triton.Config({"BLOCK_T": 16}, num_warps=4),
        triton.Config({"BLOCK_T": 32}, num_warps=4),
        triton.Config({"BLOCK_T": 32}, num_warps=8),
        triton.Config({"BLOCK_T": 64}, num_warps=8),
    ]


def _build_kernel():
    """Define the Triton kernel on first use (`@triton.jit` reads TRITON_INTERPRET when it decorates)."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    try:
        from triton.language.extra import libdevice
    except ImportError:  # pragma: no cover - very old triton
        libdevice = None
    precise_ok = libdevice is not None
    # The interpreter re-executes kernel sources against the module's globals (closures are not
    # seen), so what the kernels reference is published there.
    globals().update(tl=tl, libdevice=libdevice)

    @triton.jit
    def _cos_sin(angle, PRECISE: tl.constexpr):
        if PRECISE:
            return libdevice.cos(angle), libdevice.sin(angle)
        else:
            return tl.cos(angle), tl.sin(angle)

    @triton.jit
    def _to_output(y, dtype: tl.constexpr, SOFT_BF16: tl.constexpr):
        """fp32 -> output dtype, round to nearest even. The interpreter's own fp32->bf16 cast
        truncates, so there the rounding is done on the bits (the GPU's cvt.rn.bf16.f32 is exact)."""
        if SOFT_BF16 and dtype == tl.bfloat16:
            bits = y.to(tl.uint32, bitcast=True)
            bits = bits + (((bits >> 16) & 1) + 0x7FFF)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return y.to(dtype)

    @triton.jit
    def _rotate_head(x_ptr, x_st, o_ptr, o_st, rows64, row_ok, cos, sin,
                     HALF: tl.constexpr, HALF_PAD: tl.constexpr, PASS: tl.constexpr,
                     PASS_PAD: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_T: tl.constexpr,
                     SOFT_BF16: tl.constexpr):
        """Rotate the rows `rows64` of one head (x -> o); cos/sin are [BLOCK_T, HALF_PAD] fp32."""
        x_row = x_ptr + rows64[:, None] * x_st
        o_row = o_ptr + rows64[:, None] * o_st
        if INTERLEAVED:
            # one contiguous [BLOCK_T, rot_dim] tile, de-interleaved in registers
            c2 = tl.arange(0, 2 * HALF_PAD)
            m2 = row_ok[:, None] & (c2 < 2 * HALF)[None, :]
            x = tl.load(x_row + c2[None, :], mask=m2, other=0.0).to(tl.float32)
            x1, x2 = tl.split(tl.reshape(x, [BLOCK_T, HALF_PAD, 2]))
            y1 = x1 * cos - x2 * sin
            y2 = x2 * cos + x1 * sin
            y = tl.reshape(tl.join(y1, y2), [BLOCK_T, 2 * HALF_PAD])
            tl.store(o_row + c2[None, :], _to_output(y, o_ptr.dtype.element_ty, SOFT_BF16), mask=m2)
        else:
            c = tl.arange(0, HALF_PAD)
            m = row_ok[:, None] & (c < HALF)[None, :]
            x1 = tl.load(x_row + c[None, :], mask=m, other=0.0).to(tl.float32)
            x2 = tl.load(x_row + HALF + c[None, :], mask=m, other=0.0).to(tl.float32)
            y1 = x1 * cos - x2 * sin
            y2 = x2 * cos + x1 * sin
            tl.store(o_row + c[None, :], _to_output(y1, o_ptr.dtype.element_ty, SOFT_BF16), mask=m)
            tl.store(o_row + HALF + c[None, :], _to_output(y2, o_ptr.dtype.element_ty, SOFT_BF16), mask=m)
        if PASS > 0:  # rotary_percent < 1: the tail is copied unchanged
            pc = tl.arange(0, PASS_PAD)
            pm = row_ok[:, None] & (pc < PASS)[None, :]
            tail = tl.load(x_row + 2 * HALF + pc[None, :], mask=pm, other=0.0)
            tl.store(o_row + 2 * HALF + pc[None, :], tail, mask=pm)

    globals().update(_cos_sin=_cos_sin, _to_output=_to_output, _rotate_head=_rotate_head)

    @triton.autotune(configs=_autotune_configs(triton),
                     key=["HPG", "HALF", "PASS", "INTERLEAVED", "THD", "CP", "BACKWARD"])
    @triton.jit
    def _harpe_rope_kernel(
        q_ptr, k_ptr, oq_ptr, ok_ptr, inv_ptr, cu_ptr,
        n_tokens, n_batch, n_docs, n_search, offset, cp_size, cp_rank,
        q_st, q_sb, q_sh, k_st, k_sb, k_sh,
        oq_st, oq_sb, oq_sh, ok_st, ok_sb, ok_sh, inv_sg,
        HPG: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
        PASS: tl.constexpr, PASS_PAD: tl.constexpr, INTERLEAVED: tl.constexpr,
        THD: tl.constexpr, CP: tl.constexpr, BACKWARD: tl.constexpr, PRECISE: tl.constexpr,
        SOFT_BF16: tl.constexpr, BLOCK_T: tl.constexpr,
    ):
        """Grid (token blocks, K/V groups, batch splits). Program (t, g, j) rotates BLOCK_T tokens of
        the HPG query heads of group g and of key head g, for the batch entries j, j + splits, ...,
        with one cos/sin tile (splits = 1 unless the first two grid dimensions are small: decoding)."""
        pid_t = tl.program_id(0)
        g = tl.program_id(1)
        rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < n_tokens

        # ---- positions of the block's tokens (nothing read but cu_seqlens for thd)
        if THD:
            lo = tl.zeros([BLOCK_T], dtype=tl.int32)
            hi = lo + n_docs
            for _ in range(n_search):  # largest j with cu[j] / cp <= row
                mid = (lo + hi) // 2
                start = tl.load(cu_ptr + mid, mask=row_ok, other=0) // cp_size
                go = start <= rows
                lo = tl.where(go, mid, lo)
                hi = tl.where(go, hi, mid)
            doc_begin = tl.load(cu_ptr + lo, mask=row_ok, other=0)
            u = rows - doc_begin // cp_size
            if CP:
                doc_len = tl.load(cu_ptr + lo + 1, mask=row_ok, other=0) - doc_begin
                seg = doc_len // (2 * cp_size)
                pos = tl.where(u < seg, cp_rank * seg + u, doc_len - seg * (cp_rank + 1) + (u - seg))
            else:
                pos = u
        else:
            if CP:
                chunk = n_tokens // 2
                pos = tl.where(rows < chunk, cp_rank * chunk + rows,
                               (2 * cp_size - 1 - cp_rank) * chunk + (rows - chunk))
            else:
                pos = rows
            pos = pos + offset

        # ---- cos/sin once per (token, group, pair), fp32
        cols = tl.arange(0, HALF_PAD)
        inv = tl.load(inv_ptr + g * inv_sg + cols, mask=cols < HALF, other=0.0)
        angle = pos.to(tl.float32)[:, None] * inv[None, :]
        cos, sin = _cos_sin(angle, PRECISE)
        if BACKWARD:  # the transpose of a rotation is the rotation by the negative angle
            sin = -sin

        # 64-bit element offsets: s * b * h * d passes 2**31 at long context
        rows64 = rows.to(tl.int64)
        zero64 = tl.full([], 0, tl.int64)
        g64 = zero64 + g
        for b in range(tl.program_id(2), n_batch, tl.num_programs(2)):
            b64 = zero64 + b
            for j in tl.static_range(HPG):
                h64 = g64 * HPG + j
                _rotate_head(q_ptr + b64 * q_sb + h64 * q_sh, q_st, oq_ptr + b64 * oq_sb + h64 * oq_sh, oq_st,
                             rows64, row_ok, cos, sin, HALF, HALF_PAD, PASS, PASS_PAD, INTERLEAVED, BLOCK_T,
                             SOFT_BF16)
            _rotate_head(k_ptr + b64 * k_sb + g64 * k_sh, k_st, ok_ptr + b64 * ok_sb + g64 * ok_sh, ok_st,
                         rows64, row_ok, cos, sin, HALF, HALF_PAD, PASS, PASS_PAD, INTERLEAVED, BLOCK_T,
                         SOFT_BF16)

    _KERNEL = (_harpe_rope_kernel, precise_ok)
    return _KERNEL


# ----------------------------------------------------------------------------- checks
def _check_tensor(name: str, t: Tensor, dims: int, layout: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D for the {layout} layout, got shape {tuple(t.shape)}")
    if t.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; the fused RoPE supports float32, float16, bfloat16")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}'s last dimension must have stride 1 (got strides {tuple(t.stride())}); "
                         f"the kernel takes any seq/batch/head strides but loads each head row contiguously "
                         f"- pass {name}.contiguous() if you must")


def _check_cu_seqlens(cu: Tensor, n_tokens: int, cp_size: int) -> None:
    """Full check of a host-side cu_seqlens (on CUDA this would cost a device sync; see the docstring)."""
    values = cu.tolist()
    if values[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {values[0]}")
    lengths = [b - a for a, b in zip(values[:-1], values[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {values}")
    if cp_size > 1:
        bad = [n for n in lengths if n % (2 * cp_size)]
        if bad:
            raise ValueError(f"with context parallelism every document length must be divisible by 2 * cp_size "
                             f"({2 * cp_size}) (megatron pads them so); got lengths {bad}")
    if values[-1] % cp_size or values[-1] // cp_size != n_tokens:
        raise ValueError(f"cu_seqlens[-1] / cp_size ({values[-1]} / {cp_size}) must equal the number of local "
                         f"tokens of q and k ({n_tokens}); cu_seqlens are the GLOBAL padded cumulative lengths")


def _validate(q, k, inv_freq, cu_seqlens, cp_size, cp_rank, offset, check_cu_seqlens):
    thd = cu_seqlens is not None
    layout = "thd" if thd else "sbhd"
    dims = 3 if thd else 4
    _check_tensor("q", q, dims, layout)
    _check_tensor("k", k, dims, layout)
    if q.dtype != k.dtype:
        raise ValueError(f"q and k must have the same dtype, got {q.dtype} and {k.dtype}")
    if q.device != k.device:
        raise ValueError(f"q and k must be on the same device, got {q.device} and {k.device}")
    if q.shape[:-2] != k.shape[:-2]:
        raise ValueError(f"q and k must have the same leading ({'t' if thd else 's, b'}) dimensions, "
                         f"got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head dimension, got {q.shape[-1]} and {k.shape[-1]}")
    if not isinstance(inv_freq, Tensor) or inv_freq.dim() != 2:
        raise ValueError("inv_freq must be a 2-D tensor [groups, rot_dim // 2]")
    if inv_freq.dtype != torch.float32:
        raise ValueError(f"inv_freq must be float32 (the angles are formed in fp32), got {inv_freq.dtype}")
    if inv_freq.device != q.device:
        raise ValueError(f"inv_freq is on {inv_freq.device} but q and k are on {q.device}")
    if inv_freq.requires_grad:
        raise ValueError("inv_freq requires grad, but the fused RoPE gives it no gradient (it is not a parameter); "
                         "pass inv_freq.detach()")
    hq, hk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    groups, half = inv_freq.shape
    if half < 1:
        raise ValueError("inv_freq has no columns: rot_dim = 2 * inv_freq.shape[1] must be >= 2")
    if groups != hk:
        raise ValueError(f"inv_freq has {groups} rows but k has {hk} heads: one row per K/V group (= key head) "
                         f"held by this rank")
    if hq % groups != 0:
        raise ValueError(f"q has {hq} heads, not a multiple of the {groups} K/V groups")
    if 2 * half > d:
        raise ValueError(f"rot_dim = 2 * inv_freq.shape[1] = {2 * half} exceeds the head dimension {d}")
    if not (isinstance(cp_size, int) and cp_size >= 1 and isinstance(cp_rank, int) and 0 <= cp_rank < cp_size):
        raise ValueError(f"need an int cp_size >= 1 and 0 <= cp_rank < cp_size, got cp_size={cp_size}, "
                         f"cp_rank={cp_rank}")
    if not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative int, got {offset!r}")
    if thd:
        if offset != 0:
            raise ValueError(f"offset must be 0 with packed (thd) sequences, got {offset}: positions restart at 0 "
                             f"in every document")
        if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
            raise ValueError("cu_seqlens must be a 1-D int32 tensor [docs + 1]")
        if cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens needs at least 2 entries (one document)")
        if cu_seqlens.device != q.device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q and k are on {q.device}")
        if check_cu_seqlens is None:
            check_cu_seqlens = cu_seqlens.device.type == "cpu"
        if check_cu_seqlens:
            _check_cu_seqlens(cu_seqlens, q.shape[0], cp_size)
    elif cp_size > 1 and q.shape[0] % 2 != 0:
        raise ValueError(f"with context parallelism the local sequence length must be even (chunks r and "
                         f"2*cp-1-r), i.e. the global one divisible by 2 * cp_size; got s_local={q.shape[0]}")


# ----------------------------------------------------------------------------- launch
def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _launch_args(q, k, out_q, out_k, inv_freq, interleaved, cu_seqlens, cp_size, cp_rank, offset, backward):
    """(grid, args, constexprs) of one launch: `_launch` runs `kernel[grid](*args, **constexprs)`, and
    tests/test_fused_rope_compile.py compiles the same arguments ahead of time for sm_90/sm_100.
    PRECISE/SOFT_BF16 follow TRITON_INTERPRET: on a GPU libdevice cos/sin and the hardware bf16 cast."""
    precise_ok = _build_kernel()[1]
    thd = cu_seqlens is not None
    n_tokens = q.shape[0]
    groups, half = inv_freq.shape
    d = q.shape[-1]
    if thd:  # view as [t, 1, h, d] with batch stride 0
        n_batch, qs, ks, oqs, oks = 1, q.stride(), k.stride(), out_q.stride(), out_k.stride()
        q_st, q_sb, q_sh = qs[0], 0, qs[1]
        k_st, k_sb, k_sh = ks[0], 0, ks[1]
        oq_st, oq_sb, oq_sh = oqs[0], 0, oqs[1]
        ok_st, ok_sb, ok_sh = oks[0], 0, oks[1]
        n_docs = cu_seqlens.numel() - 1
        cu_arg = cu_seqlens
    else:
        n_batch = q.shape[1]
        q_st, q_sb, q_sh = q.stride()[:3]
        k_st, k_sb, k_sh = k.stride()[:3]
        oq_st, oq_sb, oq_sh = out_q.stride()[:3]
        ok_st, ok_sb, ok_sh = out_k.stride()[:3]
        n_docs = 1
        cu_arg = inv_freq  # unused (THD=False); any pointer
    n_search = max(1, math.ceil(math.log2(n_docs))) if n_docs > 1 else 0
    inv = inv_freq if inv_freq.stride(-1) == 1 else inv_freq.contiguous()

    def grid(meta):
        blocks = _cdiv(n_tokens, meta["BLOCK_T"])
        # batch entries share cos/sin inside a program; spread them over programs only when the
        # token x group grid alone cannot fill the GPU (short sequences, e.g. decoding)
        splits = 1 if blocks * groups >= _MIN_PROGRAMS else min(n_batch, 65535)
        return (blocks, groups, splits)

    args = (q, k, out_q, out_k, inv, cu_arg,
            n_tokens, n_batch, n_docs, n_search, offset, cp_size, cp_rank,
            q_st, q_sb, q_sh, k_st, k_sb, k_sh,
            oq_st, oq_sb, oq_sh, ok_st, ok_sb, ok_sh, inv.stride(0))
    constexprs = dict(
        HPG=q.shape[-2] // groups, HALF=half, HALF_PAD=_pow2(half),
        PASS=d - 2 * half, PASS_PAD=_pow2(max(d - 2 * half, 1)), INTERLEAVED=bool(interleaved),
        THD=thd, CP=cp_size > 1, BACKWARD=backward,
        PRECISE=precise_ok and not _interpreting(), SOFT_BF16=_interpreting(),
    )
    return grid, args, constexprs


def _launch(q, k, inv_freq, interleaved, cu_seqlens, cp_size, cp_rank, offset, backward):
    """One kernel launch rotating q and k (forward) or their gradients (backward). Returns new tensors."""
    kernel, _ = _build_kernel()
    out_q = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    out_k = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if q.shape[0] == 0 or q.numel() == 0:
        return out_q, out_k
    grid, args, constexprs = _launch_args(q, k, out_q, out_k, inv_freq, interleaved, cu_seqlens, cp_size, cp_rank,
                                          offset, backward)
    kernel[grid](*args, **constexprs)
    return out_q, out_k


class _HarpeRotaryQK(torch.autograd.Function):
    """Forward: rotate q, k by +angle. Backward: rotate dq, dk by -angle. inv_freq/cu_seqlens: no grad."""

    @staticmethod
    def forward(ctx, q, k, inv_freq, interleaved, cu_seqlens, cp_size, cp_rank, offset):
        out_q, out_k = _launch(q, k, inv_freq, interleaved, cu_seqlens, cp_size, cp_rank, offset, backward=False)
        ctx.save_for_backward(inv_freq, cu_seqlens)
        ctx.args = (interleaved, cp_size, cp_rank, offset)
        return out_q, out_k

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        inv_freq, cu_seqlens = ctx.saved_tensors
        interleaved, cp_size, cp_rank, offset = ctx.args
        # incoming gradients are internal tensors (not user inputs): make the last dim unit-stride if needed
        grad_q = grad_q if grad_q.stride(-1) == 1 else grad_q.contiguous()
        grad_k = grad_k if grad_k.stride(-1) == 1 else grad_k.contiguous()
        dq, dk = _launch(grad_q, grad_k, inv_freq, interleaved, cu_seqlens, cp_size, cp_rank, offset, backward=True)
        return dq, dk, None, None, None, None, None, None


def apply_harpe_rotary_qk(
    q: Tensor,
    k: Tensor,
    inv_freq: Tensor,
    *,
    interleaved: bool = False,
    cu_seqlens: Optional[Tensor] = None,
    cp_size: int = 1,
    cp_rank: int = 0,
    offset: int = 0,
    check_cu_seqlens: Optional[bool] = None,
) -> Tuple[Tensor, Tensor]:
    """Rotate q and k of one layer in ONE kernel launch (forward) and one launch (backward).

    Args:
        q: [s, b, hq, d] ("sbhd") or, with cu_seqlens, [t, hq, d] ("thd"); fp32/fp16/bf16, any
            strides with a unit-stride last dimension.
        k: [s, b, hk, d] or [t, hk, d], same dtype/device/leading dims as q.
        inv_freq: fp32 [G, rot_dim // 2], one row per K/V group held by this rank (G == hk);
            query head h uses row h // (hq // G).
        interleaved: pairs (2i, 2i+1) instead of (i, i + rot_dim/2) (megatron-core's two conventions).
        cu_seqlens: int32 [docs + 1], GLOBAL padded cumulative lengths (packed sequences).
        cp_size, cp_rank: context parallelism (megatron's load-balanced chunking).
        offset: first position (inference); must be 0 with cu_seqlens.
        check_cu_seqlens: check cu_seqlens' values (start 0, non-decreasing, lengths divisible by
            2*cp, total == tokens). Default: only when cu_seqlens is on the CPU, because reading
            them from the GPU would synchronise the device.

    Returns:
        (q_rotated, k_rotated): new contiguous tensors, same shape and dtype.
    """
    _validate(q, k, inv_freq, cu_seqlens, cp_size, cp_rank, offset, check_cu_seqlens)
    if not fused_rope_available():
        raise RuntimeError("the fused HARPE RoPE needs triton and CUDA (or TRITON_INTERPRET=1 set before triton "
                           "is imported, for CPU tests)")
    if q.device.type == "cpu" and not _interpreting():
        raise RuntimeError("q and k are on the CPU: the Triton kernel runs on CUDA, or on the CPU only under "
                           "TRITON_INTERPRET=1")
    return _HarpeRotaryQK.apply(q, k, inv_freq, bool(interleaved), cu_seqlens, int(cp_size), int(cp_rank),
                                int(offset))
