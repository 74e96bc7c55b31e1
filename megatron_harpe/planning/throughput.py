"""Step time, tokens per second per GPU and MFU of a layout: FLOPs at a stated efficiency, plus
communication at stated link speeds, plus the pipeline bubble.

Every term is a model, not a measurement (docs/planning.md lists them):

* compute: the project's FLOP count (``training.metrics.flops_per_token_breakdown``: 3x forward matmul
  FLOPs, causal attention counted as half the square) split over TP x CP x PP, run at
  ``efficiency`` x the GPU's dense peak (FP8 peak for the linears of FP8 layers, and for attention with
  FP8 dot-product attention); recomputation adds its forward FLOPs again.
* tensor parallelism: per layer and micro-batch, forward + backward, 8 (no SP: 4 all-reduces) or 10
  (SP: 4 all-gathers + 4 reduce-scatters + 2 all-gathers of saved inputs) units of (TP-1)/TP x
  s*b*h*B bytes over NVLink, not overlapped (megatron-core's TP overlap is not switched on).
* context parallelism: K/V of the rank's chunks passed around the CP ring (p2p: forward CP-1 hops,
  backward 2(CP-1) incl. dK/dV), hidden behind the attention compute as far as it lasts;
  all_gather / the SDPA path (all-gather + reduce-scatter) and a2a exposed.
* data parallelism: fp32 gradients reduced over DP x CP (all-reduce; with the distributed optimizer a
  reduce-scatter, plus an all-gather of the updated bf16 weights), overlapped with the last
  micro-batch's backward (forward for the weight gather) when overlap_* is on.
* pipeline: the 1F1B bubble, (PP-1)/VPP micro-batch times per step; stage-boundary sends.
* optimizer step: memory-bound Adam over this rank's share.

A collective over a group inside one node uses NVLink; one that spans nodes, the per-GPU network.
megatron-core orders ranks tp-cp-ep-dp-pp, so a group of stride k and size n stays in a node when
k x n <= GPUs per node.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict

from megatron_harpe.planning.hardware import GPU, Assumptions
from megatron_harpe.planning.memory import model_state, num_microbatches
from megatron_harpe.planning.spec import Plan
from megatron_harpe.training.metrics.flops import flops_per_token_breakdown


@dataclass
class StepTime:
    step_s: float
    tokens_per_s_per_gpu: float
    mfu: float  # model FLOPs (no recompute) per second per GPU / peak
    model_tflops_per_gpu: float
    parts_s: Dict[str, float] = field(default_factory=dict)  # per step, on the slowest stage
    notes: Dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _bandwidth(gpu: GPU, a: Assumptions, stride: int, size: int) -> float:
    """Bytes per second a ring collective over `size` ranks at rank stride `stride` reaches."""
    inside = stride * size <= gpu.gpus_per_node
    return (gpu.nvlink_gb_s if inside else gpu.network_gb_s) * 1e9 * a.link_efficiency


def step_time(plan: Plan, gpu: GPU, a: Assumptions = Assumptions()) -> StepTime:
    m, p, w = plan.model, plan.layout, plan.workload
    S, b = w.seq_length, w.micro_batch
    B = w.dtype_bytes
    t, cp, pp, dp = p.tp, p.cp, p.pp, p.dp
    vpp = p.vpp or 1
    mbs = num_microbatches(p, w)
    n_gpus = p.gpus
    bd = flops_per_token_breakdown(m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads,
                                   m.num_query_groups, m.vocab_size, S, kv_channels=m.head_dim)
    tokens_mb = S * b  # tokens of one micro-batch (all CP ranks together)
    share = tokens_mb / (t * cp)  # per GPU of one stage, the work is split TP x CP ways
    layers_stage = m.num_layers / pp

    # FLOPs per micro-batch on the slowest (last) stage, by kind
    lin = (bd["qkv_projection"] + bd["output_projection"] + bd["mlp"]) * share / pp
    attn = bd["attention"] * share / pp
    head = bd["lm_head"] * share
    sel = set(p.selective_modules)
    re_lin = re_attn = 0.0
    if p.recompute == "full":
        frac = 1.0
        if (p.recompute_method or "uniform") == "block":
            frac = min((p.recompute_num_layers or 1) * vpp / layers_stage, 1.0)
        re_lin, re_attn = frac * lin / 3, frac * attn / 3
    else:
        if "core_attn" in sel:
            re_attn = attn / 3
        if "mlp" in sel:
            re_lin = bd["mlp"] * share / pp / 3
    fp8_frac = 0.0
    if w.fp8:
        first, last = w.fp8_bf16_layers
        fp8_frac = max(m.num_layers - first - last, 0) / m.num_layers
    peak16 = gpu.bf16_tflops * 1e12 * a.efficiency
    peak8 = gpu.peak_tflops(fp8=True) * 1e12 * a.efficiency

    def compute(lin_f: float, attn_f: float) -> float:
        lin_s = lin_f * (1 - fp8_frac) / peak16 + lin_f * fp8_frac / peak8
        attn_fp8 = fp8_frac if w.fp8_dot_product_attention else 0.0
        attn_s = attn_f * (1 - attn_fp8) / peak16 + attn_f * attn_fp8 / peak8
        return lin_s + attn_s

    compute_mb = compute(lin, attn) + head / peak16
    recompute_mb = compute(re_lin, re_attn)
    attn_layer_s = compute(0.0, attn) / layers_stage  # one layer's attention, forward + backward

    # tensor parallelism (exposed)
    tp_mb = 0.0
    if t > 1:
        units = 10 if p.sequence_parallel else 8
        if p.recompute == "full":
            units += 4 if p.sequence_parallel else 2
        unit_bytes = (t - 1) / t * (S / cp) * b * m.hidden_size * B
        tp_mb = (units * layers_stage + 2) * unit_bytes / _bandwidth(gpu, a, 1, t)

    # context parallelism
    cp_mb = 0.0
    cp_note = ""
    if cp > 1:
        kv_local = 2 * (S / cp) * b * (m.num_query_groups / t) * m.head_dim * B
        bw = _bandwidth(gpu, a, t, cp)
        if w.backend == "local":
            per_layer = 2 * (cp - 1) * kv_local / bw  # all-gather forward, reduce-scatter backward
            cp_note = "SDPA: K/V all-gathered, exposed"
            cp_mb = per_layer * layers_stage
        elif p.cp_comm in ("p2p", "a2a+p2p"):
            per_layer = 3 * (cp - 1) * kv_local / bw
            cp_note = "TE ring: hidden behind attention compute where it lasts"
            cp_mb = max(0.0, per_layer - attn_layer_s) * layers_stage
        elif p.cp_comm == "all_gather":
            per_layer = 3 * (cp - 1) * kv_local / bw
            cp_note = "TE all-gather: exposed"
            cp_mb = per_layer * layers_stage
        else:  # a2a
            q = (S / cp) * b * (m.num_attention_heads / t) * m.head_dim * B
            per_layer = 2 * (cp - 1) / cp * (2 * q + kv_local) / bw
            cp_note = "TE all-to-all: exposed"
            cp_mb = per_layer * layers_stage

    # pipeline: sends at stage boundaries, bubble
    pp_mb = 0.0
    if pp > 1:
        boundary = (S / cp) * b * m.hidden_size * B / (t if p.sequence_parallel else 1)
        pp_mb = 2 * boundary / _bandwidth(gpu, a, t * cp * dp, 2)
    mb_s = compute_mb + recompute_mb + tp_mb + cp_mb + pp_mb
    bubble = (pp - 1) / vpp * mb_s

    # data parallelism over DP x CP
    dp_s = 0.0
    st = model_state(m, p, w, pp_rank=pp - 1)
    n = dp * cp
    if n > 1:
        bw = _bandwidth(gpu, a, t, n)
        grads = 4 * st.params
        if p.dist_opt:
            rs = (n - 1) / n * grads / bw
            ag = (n - 1) / n * B * st.params / bw
        else:
            rs, ag = 2 * (n - 1) / n * grads / bw, 0.0
        bwd_last = 2 / 3 * compute_mb
        fwd_first = 1 / 3 * compute_mb
        dp_s = (max(0.0, rs - bwd_last) if p.overlap_grad_reduce else rs) + \
            (max(0.0, ag - fwd_first) if p.overlap_param_gather else ag)
    opt_elements = (st.moments / 8)
    optimizer_s = opt_elements * (4 + 2 * 4 + 2 * 8 + B) / (gpu.hbm_tb_s * 1e12)

    step = mbs * mb_s + bubble + dp_s + optimizer_s
    tokens_step = w.global_batch * S
    model_flops_gpu = bd["total"] * tokens_step / n_gpus
    peak = gpu.peak_tflops(fp8=bool(w.fp8)) * 1e12
    parts = {"compute": mbs * compute_mb, "recompute": mbs * recompute_mb, "tensor-parallel comm": mbs * tp_mb,
             "context-parallel comm (exposed)": mbs * cp_mb, "pipeline sends": mbs * pp_mb,
             "pipeline bubble": bubble, "data-parallel comm (exposed)": dp_s, "optimizer step": optimizer_s}
    notes = {"efficiency": f"{a.efficiency:.0%} of {gpu.bf16_tflops:g} TFLOP/s bf16"
                           + (f" / {gpu.fp8_tflops:g} FP8" if w.fp8 and gpu.fp8_tflops else ""),
             "links": f"NVLink {gpu.nvlink_gb_s:g} GB/s, network {gpu.network_gb_s:g} GB/s per GPU, "
                      f"x {a.link_efficiency:.0%}",
             "micro-batches per step": str(mbs)}
    if cp_note:
        notes["context parallelism"] = cp_note
    return StepTime(step_s=step, tokens_per_s_per_gpu=tokens_step / step / n_gpus,
                    mfu=model_flops_gpu / step / peak, model_tflops_per_gpu=model_flops_gpu / step / 1e12,
                    parts_s=parts, notes=notes)
