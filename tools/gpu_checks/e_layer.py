"""Section e, one Llama-2-7B-shaped layer built from the project's spec, forward and backward: one-base RoPE,
the HARPE table and the fused HARPE kernel on the same weights; whether they agree, and what HARPE costs."""
from __future__ import annotations

import statistics

from .common import CPU_LABEL, Env, Section, free_memory, gib, group_bases, ms, now, peak_extra, time_calls


def run(sec: Section, env: Env) -> None:
    import torch
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.transformer_block import TransformerBlock

    from megatron_harpe.config.model import ModelConfig, PositionEmbeddingConfig
    from megatron_harpe.convert.megatron_io import single_process_world
    from megatron_harpe.models.spec import llama_block_spec, transformer_engine_available
    from megatron_harpe.models.transformer_config import build_transformer_config, fusion_settings, rope_kernel
    from megatron_harpe.rope.fused_kernel import fused_rope_available
    from megatron_harpe.rope.harpe_rotary import HarpeRotaryEmbedding

    z = env.sizes["e"]
    S, Hd, nh, ng, ffn = z["seq"], z["hidden"], z["heads"], z["groups"], z["ffn"]
    d = Hd // nh
    bases = group_bases(ng, env.cpu)
    te = env.cuda and transformer_engine_available()
    sec.log(f"layer: hidden {Hd}, {nh} heads ({ng} K/V groups) x {d}, ffn {ffn}, seq {S}, batch 1, bf16, "
            f"spec {'Transformer Engine' if te else 'local (megatron-core linears + SDPA core attention)'}")
    common = dict(num_layers=1, hidden_size=Hd, ffn_hidden_size=ffn, num_attention_heads=nh, num_query_groups=ng,
                  vocab_size=32000, max_position_embeddings=S)
    mc_h = ModelConfig(**common, position=PositionEmbeddingConfig(kind="harpe", bases=bases))
    mc_r = ModelConfig(**common, position=PositionEmbeddingConfig(kind="rope", base=bases[0]))
    kernel_r = rope_kernel(mc_r, cuda=env.cuda, te=te, triton=fused_rope_available())
    sec.number("shape", dict(seq=S, hidden=Hd, heads=nh, groups=ng, ffn=ffn, head_dim=d, te=te,
                             one_base_apply=("TE fused RoPE" if kernel_r == "fused" else "megatron-core unfused")))

    def config(mc, kernel):
        fus = fusion_settings(mc, cuda=env.cuda, te=te, kernel=kernel)
        fus["gradient_accumulation_fusion"] = False  # no DDP main_grad buffers around a bare layer
        return build_transformer_config(mc, params_dtype=torch.bfloat16, use_cpu_initialization=not env.cuda,
                                        fusions=fus)

    with single_process_world():
        torch.manual_seed(5)
        block_r = TransformerBlock(config(mc_r, kernel_r), llama_block_spec(config(mc_r, kernel_r), use_te=te))
        block_h = TransformerBlock(config(mc_h, "unfused"), llama_block_spec(config(mc_h, "unfused"), use_te=te,
                                                                               harpe=True))
        if env.cuda:
            block_r.cuda()
            block_h.cuda()
        missing = block_h.load_state_dict(block_r.state_dict(), strict=False)
        shared = not missing.missing_keys and not missing.unexpected_keys
        sec.check("HARPE layer loads the one-base layer's weights (same parameters, attention class aside)", shared,
                  value=f"missing {missing.missing_keys}, unexpected {missing.unexpected_keys}")
        n_params = sum(p.numel() for p in block_h.parameters())
        sec.number("parameters", n_params)
        rot_r = RotaryEmbedding(kv_channels=d, rotary_percent=1.0, rotary_base=bases[0], use_cpu_initialization=True)
        kw = dict(kv_channels=d, rotary_percent=1.0, bases=bases, num_attention_heads=nh, num_query_groups=ng)
        rot_table, rot_fused = HarpeRotaryEmbedding(**kw), HarpeRotaryEmbedding(**kw, fused=True)
        rot_equal = HarpeRotaryEmbedding(**{**kw, "bases": [bases[0]] * ng})
        variants = {"one-base": (block_r, lambda: rot_r(S)), "harpe-table": (block_h, lambda: rot_table(S)),
                    "harpe-fused": (block_h, lambda: rot_fused(S))}
        gen = torch.Generator(device=env.device).manual_seed(6)
        x = torch.randn(S, 1, Hd, device=env.device, dtype=torch.bfloat16, generator=gen).requires_grad_()
        gout = torch.randn(S, 1, Hd, device=env.device, dtype=torch.bfloat16, generator=gen)

        def step(name):
            block, emb = variants[name]
            for p in block.parameters():
                p.grad = None
            x.grad = None
            out = block(hidden_states=x, attention_mask=None, rotary_pos_emb=emb())
            out.backward(gout)
            return out

        # ---- correctness: the three paths compute the same layer
        sec.need(5, "correctness steps")
        out_t = step("harpe-table").detach().clone()
        gx_t = x.grad.detach().clone()
        out_f = step("harpe-fused").detach().clone()
        gx_f = x.grad.detach().clone()
        rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
        r_out, r_g = rel(out_f, out_t), rel(gx_f, gx_t)
        sec.check("HARPE fused vs table layer: output", r_out <= 1e-2, value={"relative_l2": r_out},
                  tolerance="1e-2 relative L2 (bf16 layer; q/k differ by <= 1 bf16 ulp between the paths)")
        sec.check("HARPE fused vs table layer: input gradient", r_g <= 1e-2, value={"relative_l2": r_g},
                  tolerance="1e-2 relative L2")
        with torch.no_grad():
            o_eq = block_h(hidden_states=x, attention_mask=None, rotary_pos_emb=rot_equal(S))
            o_r = block_r(hidden_states=x, attention_mask=None, rotary_pos_emb=rot_r(S))
        if kernel_r == "unfused":
            sec.check("HARPE layer with all bases equal == one-base layer, forward (torch.equal)", torch.equal(o_eq, o_r),
                      value={"max_abs_diff": (o_eq.float() - o_r.float()).abs().max().item()}, tolerance="bit-identical")
        else:
            r = rel(o_eq, o_r)
            sec.check("HARPE layer with all bases equal vs one-base layer (TE fused RoPE), forward", r <= 1e-2,
                      value={"relative_l2": r}, tolerance="1e-2 relative L2 (TE rounds differently)")
        del out_t, gx_t, out_f, gx_f, o_eq, o_r
        free_memory(env)

        # ---- time: rounds interleave the variants so drift hits all alike
        names = list(variants)
        times = {n_: [] for n_ in names}
        last_round = 0.0
        for r in range(z["warmup"] + z["rounds"]):
            if r > z["warmup"] and sec.remaining() < 2 * last_round + 5:  # keep a round's time for the memory pass
                sec.note(f"timing stopped after {r - z['warmup']} of {z['rounds']} rounds: the section's cap is near")
                break
            t_round = now()
            for name in names:
                tm = time_calls(env, lambda: step(name), 1, 0)[0]
                if r >= z["warmup"]:
                    times[name].append(tm)
            last_round = now() - t_round
        sec.need(last_round + 2, "the memory pass")
        peaks = {name: peak_extra(env, lambda: step(name)) for name in names}
        base_mem = torch.cuda.memory_allocated() if env.cuda else None
        med = {name: statistics.median(v) for name, v in times.items()}
        rows = []
        for name in names:
            ratio = med[name] / med["one-base"]
            rows.append([name, ms(med[name]), ms(min(times[name])), ms(max(times[name])), f"{ratio:.4f}",
                         gib(peaks[name])])
            sec.number(f"{name}", dict(median_s=med[name], min_s=min(times[name]), max_s=max(times[name]),
                                       ratio_to_one_base=ratio, peak_extra_bytes=peaks[name]))
        sec.number("memory_allocated_between_steps_bytes", base_mem)
        sec.number("harpe_table_bytes", sum(t.numel() * t.element_size() for t in [rot_table(S)]))
        sec.table(f"fwd+bwd step, median of {len(times['one-base'])} interleaved rounds"
                  + (f" [{CPU_LABEL}]" if env.cpu else ""),
                  ["variant", "median ms", "min ms", "max ms", "ratio to one-base", "peak extra memory"], rows,
                  note="peak extra memory: max_memory_allocated during one step beyond what was allocated before it "
                       "(weights, input); the HARPE table variant's cached angle table is allocated before the step")
        ratio_fused = med["harpe-fused"] / med["one-base"]
        ratio_table = med["harpe-table"] / med["one-base"]
        sec.log(f"  step: one-base {ms(med['one-base'])} ms, HARPE table {ms(med['harpe-table'])} ms "
                f"({ratio_table:.3f}x), HARPE fused {ms(med['harpe-fused'])} ms ({ratio_fused:.3f}x)"
                + (f"  [{CPU_LABEL}]" if env.cpu else ""))
        if env.cuda:
            sec.target("HARPE fused step time / one-base", ratio_fused <= 1.01, ratio_fused, "<= 1.01 (issue goal)")
            sec.target("HARPE table step time / one-base", ratio_table <= 1.05, ratio_table, "<= 1.05")
        else:
            sec.skip("step-time targets", "CPU mode: no performance numbers")
        del x, gout, block_r, block_h, variants
    free_memory(env)

