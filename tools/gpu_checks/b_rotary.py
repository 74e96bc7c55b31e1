"""Section b, HARPE rotary on the device: HarpeRotaryEmbedding's tables with megatron-core's
_apply_rotary_pos_emb_bshd, and the fused Triton kernel, against float64 references (fp32 and bf16, forward
and gradients); with all bases equal the HARPE table is megatron-core's RotaryEmbedding table bit for bit."""
from __future__ import annotations

from .common import Env, Section, free_memory, group_bases, sync
from .reference import (ANGLE_BOUND, HALF_ULP_BF16, TOL_BF16_FUSED, TOL_BF16_UNFUSED, TOL_FP32, angles64,
                        pair_mag, rel_err, rotate64)


def run(sec: Section, env: Env) -> None:
    import torch
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_harpe.rope.fused_kernel import apply_harpe_rotary_qk
    from megatron_harpe.rope.harpe_rotary import HarpeRotaryEmbedding

    z = env.sizes["b"]
    S, hq, hk, d = z["seq"], z["hq"], z["hk"], z["d"]
    hpg = hq // hk
    bases = group_bases(hk, env.cpu)
    sec.log(f"seq {S}, {hq} query / {hk} K/V heads x {d}, batch 1, bases {bases}")
    sec.number("shape", dict(seq=S, q_heads=hq, kv_heads=hk, head_dim=d, bases=bases))
    kw = dict(kv_channels=d, rotary_percent=1.0, bases=bases, num_attention_heads=hq, num_query_groups=hk)
    table_mod = HarpeRotaryEmbedding(**kw)
    fused_mod = HarpeRotaryEmbedding(**kw, fused=True)
    table = table_mod(S)
    inv = fused_mod(S)
    sec.check("table on the device, [s, 1, groups, d]", table.device.type == env.device.type
              and tuple(table.shape) == (S, 1, hk, d), value=f"{tuple(table.shape)} on {table.device}")
    sec.check("fused mode hands the kernel inv_freq [groups, d/2] on the device",
              inv.device.type == env.device.type and tuple(inv.shape) == (hk, d // 2),
              value=f"{tuple(inv.shape)} on {inv.device}")

    pos = torch.arange(S, device=env.device)
    inv32 = table_mod.inv_freq
    angles = {"fp32-angle": (angles64(pos, bases, inv32, d, hpg, exact=False),
                             angles64(pos, bases, inv32, d, 1, exact=False)),
              "exact-angle": (angles64(pos, bases, inv32, d, hpg, exact=True),
                              angles64(pos, bases, inv32, d, 1, exact=True))}
    angle_tol = S * ANGLE_BOUND
    rows = []
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        sec.need(3, f"{dtype_name} rotation checks")
        gen = torch.Generator(device=env.device).manual_seed(1)
        q = torch.randn(S, 1, hq, d, device=env.device, dtype=dtype, generator=gen)
        k = torch.randn(S, 1, hk, d, device=env.device, dtype=dtype, generator=gen)
        gq = torch.randn(S, 1, hq, d, device=env.device, dtype=dtype, generator=gen)
        gk = torch.randn(S, 1, hk, d, device=env.device, dtype=dtype, generator=gen)
        out, grads = {}, {}
        # unfused: the module's table (cached), each query head its group's angles, megatron-core's apply
        qr, kr = q.clone().requires_grad_(), k.clone().requires_grad_()
        qa, ka = table_mod.query_and_key_angles(table_mod(S))
        out["unfused"] = (_apply_rotary_pos_emb_bshd(qr, qa), _apply_rotary_pos_emb_bshd(kr, ka))
        grads["unfused"] = torch.autograd.grad(out["unfused"], (qr, kr), (gq, gk))
        # fused: one Triton launch for q and k (and one for both gradients)
        qf, kf = q.clone().requires_grad_(), k.clone().requires_grad_()
        out["fused"] = apply_harpe_rotary_qk(qf, kf, fused_mod(S))
        grads["fused"] = torch.autograd.grad(out["fused"], (qf, kf), (gq, gk))
        sync(env)
        mags = (pair_mag(q), pair_mag(k))
        gmags = (pair_mag(gq), pair_mag(gk))
        if dtype == torch.float32:
            tol = {"fused": TOL_FP32, "unfused": TOL_FP32}
            tol_text = {p: "1e-5 x |z| (fp32 rotation of the same fp32 angle)" for p in tol}
        else:
            tol = {"fused": TOL_BF16_FUSED * HALF_ULP_BF16, "unfused": TOL_BF16_UNFUSED * HALF_ULP_BF16}
            tol_text = {"fused": "half a bf16 ulp (2^-8 x |z|, +1%): one rounding of the fp32 result",
                        "unfused": "2 bf16 ulps (4 x 2^-8 x |z|): cos/sin, products and sum rounded to bf16"}
        for path in ("unfused", "fused"):
            for mode in ("fp32-angle", "exact-angle"):
                aq, ak = angles[mode]
                extra = angle_tol if mode == "exact-angle" else 0.0
                worst = {"max_abs_err": 0.0, "max_err_over_pair_mag": 0.0}
                for got, x, a, m in ((out[path][0], q, aq, mags[0]), (out[path][1], k, ak, mags[1])):
                    e = rel_err(got, rotate64(x, a), m)
                    worst = {key: max(worst[key], e[key]) for key in worst}
                limit = tol[path] + extra
                text = tol_text[path] + (f" + seq x 2^-22 = {extra:.2e} (the fp32 angle's rounding)" if extra else "")
                sec.check(f"{dtype_name} {path} forward vs float64 ({mode})", worst["max_err_over_pair_mag"] <= limit,
                          value=worst, tolerance=f"{limit:.3g} x |z|: {text}")
                rows.append([dtype_name, path, f"forward ({mode})", worst["max_abs_err"],
                             worst["max_err_over_pair_mag"], limit])
            # gradients: the backward is the rotation by the negative angle
            aq, ak = angles["fp32-angle"]
            worst = {"max_abs_err": 0.0, "max_err_over_pair_mag": 0.0}
            for got, g, a, m in ((grads[path][0], gq, aq, gmags[0]), (grads[path][1], gk, ak, gmags[1])):
                e = rel_err(got, rotate64(g, a, sign=-1.0), m)
                worst = {key: max(worst[key], e[key]) for key in worst}
            sec.check(f"{dtype_name} {path} gradients vs float64 (rotation by -angle)",
                      worst["max_err_over_pair_mag"] <= tol[path], value=worst,
                      tolerance=f"{tol[path]:.3g} x |grad pair|: {tol_text[path]}")
            rows.append([dtype_name, path, "gradients (fp32-angle)", worst["max_abs_err"],
                         worst["max_err_over_pair_mag"], tol[path]])
        both = tol["fused"] + tol["unfused"]
        for what, a_pair, b_pair, m_pair in (("forward", out["fused"], out["unfused"], mags),
                                             ("gradients", grads["fused"], grads["unfused"], gmags)):
            e = max(((x.double() - y.double()).abs() / m).max().item() for x, y, m in zip(a_pair, b_pair, m_pair))
            d_abs = max((x.double() - y.double()).abs().max().item() for x, y in zip(a_pair, b_pair))
            sec.check(f"{dtype_name} fused vs unfused {what}", e <= both,
                      value={"max_abs_diff": d_abs, "max_diff_over_pair_mag": e},
                      tolerance=f"{both:.3g} x |z| (the two paths' bounds added)")
            rows.append([dtype_name, "fused vs unfused", what, d_abs, e, both])
        del q, k, gq, gk, qr, kr, qf, kf, out, grads, mags, gmags
        free_memory(env)
    sec.table("errors (|z| = magnitude of the rotated pair)",
              ["dtype", "path", "what", "max abs err", "max err / |z|", "tolerance / |z|"], rows)

    # equal bases: HARPE's table is megatron-core's RotaryEmbedding table bit for bit, on the device
    for base in sorted({10000.0, bases[0], bases[-1]}):
        harpe = HarpeRotaryEmbedding(**{**kw, "bases": [base] * hk})(S)
        mega = RotaryEmbedding(kv_channels=d, rotary_percent=1.0, rotary_base=base, use_cpu_initialization=True)(S)
        same = harpe.device == mega.device and all(torch.equal(harpe[:, :, g:g + 1], mega) for g in range(hk))
        sec.check(f"all bases {base:g}: HARPE table == megatron-core RotaryEmbedding table (torch.equal)", same,
                  value=f"{tuple(harpe.shape)} vs {tuple(mega.shape)} on {harpe.device} / {mega.device}",
                  tolerance="bit-identical")

