"""Section d, the SDPA core attention used without Transformer Engine (parallel/core_attention.py): correct
against the math backend, and its time and peak memory at long context with the flash backend forced, in
both mask shapes it issues (causal, and lower-right for a context-parallel chunk)."""
from __future__ import annotations

import contextlib
import math
import statistics
import warnings

from .common import CPU_LABEL, Env, Section, free_memory, gib, ms, peak_extra, time_calls


def _attention_flops(n_q: int, n_k: int, heads: int, d: int) -> float:
    """Forward FLOPs of causal attention aligned bottom-right (2 matmuls x 2 flops x admitted (q, k) pairs)."""
    pairs = n_q * (n_k - n_q) + n_q * (n_q + 1) / 2
    return 4.0 * heads * d * pairs


def run(sec: Section, env: Env) -> None:
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_harpe.parallel.core_attention import SDPACoreAttention

    z = env.sizes["d"]
    H, d = z["heads"], z["d"]
    if env.cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def flash():
            return sdpa_kernel([SDPBackend.FLASH_ATTENTION])
    else:
        flash = None
        sec.skip("flash backend forced", "CPU mode: SDPA's flash backend is CUDA only; the CPU path (explicit "
                 "lower-right mask, CPU kernels) is what runs")

    def core_for(groups: int, mask: AttnMaskType):
        cfg = TransformerConfig(num_layers=1, hidden_size=H * d, num_attention_heads=H, num_query_groups=groups,
                                kv_channels=d, attention_dropout=0.0, hidden_dropout=0.0, bf16=True,
                                params_dtype=torch.bfloat16, use_cpu_initialization=True)
        return SDPACoreAttention(cfg, layer_number=1, attn_mask_type=mask, attention_type="self")

    cases = [("causal", AttnMaskType.causal, 1), ("lower-right", AttnMaskType.causal_bottom_right, 4)]
    sec.note("lower-right = one CP chunk's call: cp=2, rank 0's second chunk (global chunk 3 of 4) attends every "
             "key before it: q = S/4 rows, k/v = S rows, mask aligned bottom-right (the module passes "
             "causal_lower_right on CUDA; on CPU an explicit [q, k] mask)")

    def inputs(n_q, n_k, groups, requires_grad, seed):
        gen = torch.Generator(device=env.device).manual_seed(seed)
        mk = lambda n, h: torch.randn(n, 1, h, d, device=env.device, dtype=torch.bfloat16,  # noqa: E731
                                      generator=gen).requires_grad_(requires_grad)
        return mk(n_q, H), mk(n_k, groups), mk(n_k, groups)

    # ---- correctness vs the math backend, fp32 reference on the same bf16 inputs
    n = z["correctness_seq"]
    rows = []
    for groups in z["groups"]:
        for name, mask, div in cases:
            sec.need(2, "correctness")
            core = core_for(groups, mask)
            q, k, v = inputs(n // div, n, groups, True, 3)
            gout = torch.randn(n // div, 1, H * d, device=env.device, dtype=torch.bfloat16)
            backend = "default (CPU)"
            try:
                with (flash() if flash else contextlib.nullcontext()):
                    out = core(q, k, v, None, mask)
                    grads = torch.autograd.grad(out, (q, k, v), gout)
                if flash:
                    backend = "flash"
            except RuntimeError as err:
                sec.note(f"correctness {name} groups {groups}: flash refused ({str(err).splitlines()[0][:200]}); "
                         f"checked with the default backends")
                backend = "default (flash refused)"
                out = core(q, k, v, None, mask)
                grads = torch.autograd.grad(out, (q, k, v), gout)
            # reference: math backend, fp32, explicit lower-right mask, K/V expanded to the query heads
            q32, k32, v32 = (t.detach().float().permute(1, 2, 0, 3).requires_grad_() for t in (q, k, v))
            rep = H // groups
            ke, ve = k32.repeat_interleave(rep, dim=1), v32.repeat_interleave(rep, dim=1)
            allowed = torch.ones(q.size(0), n, dtype=torch.bool, device=env.device).tril(n - q.size(0))
            ctx = sdpa_kernel([SDPBackend.MATH]) if env.cuda else contextlib.nullcontext()
            with ctx:
                ref = F.scaled_dot_product_attention(q32, ke, ve, attn_mask=allowed, scale=1.0 / math.sqrt(d))
            ref_out = ref.permute(2, 0, 1, 3).reshape(q.size(0), 1, H * d)
            ref_grads = torch.autograd.grad(ref_out, (q32, k32, v32), gout.float())
            vmax = v.detach().abs().max().item()
            out_err = (out.float() - ref_out).abs().max().item()
            out_tol = 2.0 ** -7 * vmax
            sec.check(f"{name} GQA {H}/{groups} at {n} tokens ({backend}): output vs fp32 math", out_err <= out_tol,
                           value={"max_abs_err": out_err}, tolerance=f"2^-7 x max|v| = {out_tol:.3g} (bf16 P.V and "
                           f"output rounding: <= 2^-8 x max|v|)")
            g_errs = []
            for label, g, rg in zip("qkv", grads, ref_grads):
                rg = rg.permute(2, 0, 1, 3)
                e = (g.float() - rg).abs().max().item() / max(rg.abs().max().item(), 1e-30)
                g_errs.append(e)
            sec.check(f"{name} GQA {H}/{groups} at {n} tokens ({backend}): dq, dk, dv vs fp32 math",
                      max(g_errs) <= 2.0 ** -5, value={"max_err_over_max_ref": max(g_errs)},
                      tolerance="2^-5 x max|reference gradient| (bf16 inputs, bf16 gradients)")
            rows.append([name, f"{H}/{groups}", n // div, n, backend, out_err, out_tol, max(g_errs)])
            del q, k, v, out, grads, ref, ref_out, ref_grads, q32, k32, v32, ke, ve
    sec.table("correctness vs the math backend (fp32 reference, bf16 inputs)",
              ["mask", "heads q/kv", "q", "k", "backend", "out max abs err", "out tol", "grad max err / max ref"],
              rows)
    free_memory(env)

    # ---- time and memory at long context
    rows = []
    for S in z["seqs"]:
        for groups in z["groups"]:
            for name, mask, div in cases:
                # ~5 forward and 5 forward+backward calls; causal at 128k: ~0.3 s + ~1.1 s each on an H100/H200
                est = (8.0 * (S / 131072) ** 2 * (1.0 if name == "causal" else 0.45) if env.cuda else 0.0) + 1
                sec.need(est, f"timing {name} at {S} tokens, heads {H}/{groups}")
                n_q, n_k = S // div, S
                case = f"{name} at {S} tokens, heads {H}/{groups}"
                core = core_for(groups, mask)
                q, k, v = inputs(n_q, n_k, groups, True, 4)
                gout = torch.randn(n_q, 1, H * d, device=env.device, dtype=torch.bfloat16)
                # what to try, in order: the flash kernel forced (GPU, when SDPA would take it), then whatever
                # SDPA picks by itself (on a GPU without flash that may be the math kernel: O(S^2) memory)
                attempts = []
                if env.cuda:
                    usable, why = _flash_usable(q, k, v, H, groups, name)
                    if usable:
                        attempts.append(("flash", flash))
                    else:
                        sec.target(f"flash backend usable, {case}", False, why, "usable")
                    attempts.append(("default" if usable else "default (flash refused)", contextlib.nullcontext))
                else:
                    attempts.append(("default (CPU)", contextlib.nullcontext))
                result, failures = None, []
                for backend, ctx in attempts:

                    def fwd(ctx=ctx):
                        with torch.no_grad(), ctx():
                            return core(q, k, v, None, mask)

                    def fwd_bwd(ctx=ctx):
                        with ctx():
                            out = core(q, k, v, None, mask)
                        out.backward(gout)
                        q.grad = k.grad = v.grad = None

                    # a fallback on the GPU may be the math kernel (seconds, tens of GiB): time it once
                    rep, warm = (z["repeat"], z["warmup"]) if backend == "flash" or env.cpu else (1, 0)
                    try:
                        t_f = time_calls(env, fwd, rep, warm)
                        t_fb = time_calls(env, fwd_bwd, rep, warm)
                        result = (backend, t_f, t_fb, peak_extra(env, fwd), peak_extra(env, fwd_bwd))
                        break
                    except RuntimeError as err:  # refused kernel, out of memory: recorded, next attempt
                        msg = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
                        failures.append(f"{backend}: {msg}")
                        sec.log(f"  {case}: {backend} failed: {msg}")
                        q.grad = k.grad = v.grad = None
                        free_memory(env)
                        if backend == "flash":
                            sec.target(f"flash backend runs, {case}", False, msg, "runs")
                if env.cuda and result is not None and result[0] == "flash":
                    sec.target(f"flash backend runs, {case}", True, "runs", "runs")
                sec.check(f"SDPA core attention runs, {case}", result is not None,
                          value=result[0] if result else "; ".join(failures))
                if result is None:
                    rows.append([name, S, f"{H}/{groups}", n_q, n_k, "failed: " + "; ".join(failures)[:200]]
                                + ["-"] * 6)
                    del q, k, v, gout, core
                    free_memory(env)
                    continue
                backend, t_f, t_fb, m_f, m_fb = result
                flops = _attention_flops(n_q, n_k, H, d)
                mf, mfb = statistics.median(t_f), statistics.median(t_fb)
                row = dict(mask=name, seq=S, heads=f"{H}/{groups}", q=n_q, k=n_k, backend=backend,
                           fwd_ms=mf * 1e3, fwd_bwd_ms=mfb * 1e3, fwd_tflops=flops / mf / 1e12,
                           fwd_bwd_tflops=3.5 * flops / mfb / 1e12, fwd_peak_bytes=m_f, fwd_bwd_peak_bytes=m_fb,
                           failed_attempts=failures)
                sec.number(f"{name}_{S}_{H}x{groups}", row)
                sec.log(f"  {name:11s} S={S:6d} heads {H}/{groups}: fwd {mf * 1e3:9.3f} ms, fwd+bwd {mfb * 1e3:9.3f} ms, "
                        f"peak +{gib(m_fb) if m_fb is not None else 'n/a'}  [{backend}]"
                        + (f"  [{CPU_LABEL}]" if env.cpu else ""))
                rows.append([name, S, f"{H}/{groups}", n_q, n_k, backend, ms(mf), ms(mfb),
                             f"{row['fwd_tflops']:.1f}", f"{row['fwd_bwd_tflops']:.1f}", gib(m_f), gib(m_fb)])
                del q, k, v, gout, core
                free_memory(env)
    sec.table(f"time (median of {z['repeat']}, {'CUDA events' if env.cuda else 'perf_counter'}; a fallback "
              f"backend once) and peak memory (max_memory_allocated delta)"
              + (f" [{CPU_LABEL}]" if env.cpu else ""),
              ["mask", "S", "heads q/kv", "q", "k", "backend", "fwd ms", "fwd+bwd ms", "fwd TFLOP/s",
               "fwd+bwd TFLOP/s", "fwd peak", "fwd+bwd peak"], rows,
              note="TFLOP/s: 4*heads*d*(admitted q,k pairs) forward, x3.5 forward+backward")


def _flash_usable(q, k, v, heads: int, groups: int, case: str):
    """(usable, reason): would SDPA's flash kernel take this call (the module expands K/V for lower-right)."""
    import torch
    from torch.backends.cuda import SDPAParams, can_use_flash_attention

    qb = q.detach().permute(1, 2, 0, 3)
    kb, vb = k.detach().permute(1, 2, 0, 3), v.detach().permute(1, 2, 0, 3)
    gqa = heads != groups
    if case == "lower-right" and gqa:
        kb = kb.repeat_interleave(heads // groups, dim=1)
        vb = vb.repeat_interleave(heads // groups, dim=1)
        gqa = False
    try:
        params = SDPAParams(qb, kb, vb, None, 0.0, case == "causal", gqa)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ok = bool(can_use_flash_attention(params, False))
    except Exception as err:  # noqa: BLE001
        return False, f"probe failed: {err}"
    del kb, vb
    torch.cuda.empty_cache()
    return ok, "ok" if ok else "can_use_flash_attention() is False"

