"""Float64 references for a rotation (sections b and c) and the tolerances it is judged by."""
from __future__ import annotations

from typing import Dict

# Tolerances (relative to |z| = sqrt(x1^2 + x2^2), the magnitude of the rotated pair, which the rotation
# preserves; a pair's components are <= |z| and so are their rounding errors' scale).
TOL_FP32 = 1e-5              # fp32 rotation of the same fp32 angle: a few fp32 ulps
HALF_ULP_BF16 = 2.0 ** -8    # half a bf16 ulp of a value v is <= 2^-8 |v|
TOL_BF16_FUSED = 1.01        # in half-ulps: one rounding of an fp32 result (+1% for the fp32 arithmetic)
TOL_BF16_UNFUSED = 4.0       # in half-ulps: megatron-core rounds cos/sin, each product and the sum to bf16
ANGLE_BOUND = 2.0 ** -22     # x seq: the fp32 angle p * inv_freq is within ~1.23 * p * 2^-24 rad of exact


def angles64(positions, bases, inv_freq32, d: int, heads_per_group: int, exact: bool):
    """[s, 1, heads, d/2] float64 angles; query head h uses group h // heads_per_group.

    exact=False: the fp32 angle float32(p) * inv_freq (what both apply paths form), in float64;
    exact=True: p * base^(-2i/d) computed in float64 from the base."""
    import torch

    if exact:
        i = torch.arange(0, d, 2, dtype=torch.float64, device=positions.device) / d
        theta = torch.stack([float(b) ** (-i) for b in bases])  # [G, d/2]
        ang = positions.to(torch.float64)[:, None, None] * theta[None]
    else:
        ang = (positions.to(torch.float32)[:, None, None] * inv_freq32.to(positions.device)[None]).to(torch.float64)
    if heads_per_group > 1:
        ang = ang.repeat_interleave(heads_per_group, dim=1)
    return ang.unsqueeze(1)  # [s, 1, heads, d/2]


def rotate64(x, ang, sign: float = 1.0):
    """Rotate pairs (i, i + d/2) of x [s, b, h, d] by sign * ang, in float64."""
    import torch

    x = x.detach().to(torch.float64)
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    c, s = torch.cos(ang), sign * torch.sin(ang)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def pair_mag(x):
    """|z| of each element's pair (i, i + d/2), in float64, for both elements of the pair."""
    import torch

    x = x.detach().to(torch.float64)
    h = x.shape[-1] // 2
    m = torch.sqrt(x[..., :h] ** 2 + x[..., h:] ** 2)
    return torch.cat([m, m], dim=-1).clamp_min(1e-30)


def rel_err(got, ref, mag) -> Dict[str, float]:
    """The largest absolute error of got against ref, and the largest relative to |z|."""
    err = (got.detach().to(ref.dtype) - ref).abs()
    return {"max_abs_err": err.max().item(), "max_err_over_pair_mag": (err / mag).max().item()}

