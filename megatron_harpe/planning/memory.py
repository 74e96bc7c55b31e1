"""Memory per GPU of one training step: model state exactly, activations by what autograd keeps.

Model state (weights, gradients, optimizer state) is computed exactly: the parameter list of a
pipeline stage is laid out the way megatron-core 0.16.1's DDP lays it out (parameters in reverse
order; with the distributed optimizer every parameter starts at a multiple of 64 elements and every
bucket ends at a multiple of lcm(DP x CP, 128)), then sharded the way its distributed optimizer
shards it (each bucket split evenly over the DP x CP ranks; a rank keeps fp32 master weights and the
two Adam moments for the parameter elements inside its shard). What the trainer sets decides the
rest: gradients are fp32 (``grad_reduce_in_fp32=True``), weights in the compute dtype, fp32 master
weights only for bf16 weights.

Activations are the tensors autograd saves for the backward pass, dedup'd by storage, one term per
tensor, for megatron-core's Llama layer as this project builds it. Two software paths:

* ``local`` (megatron-core's linears, this project's RMSNorm and SDPA core attention; CPU runs and GPUs
  without Transformer Engine). Every term was read off a forward pass under
  ``torch.autograd.graph.saved_tensors_hooks`` (planning/measure.py does that for any layout) and is
  checked against one by tests/test_planning.py.
* ``te`` (Transformer Engine spec: RMSNorm fused into the QKV and FC1 linears, TE's fused/flash
  attention and its ring context parallelism). Modelled from what TE's modules save (input and
  normalised input of each LayerNormLinear, q/k/v/out and softmax statistics of the fused attention,
  the FC1 output kept by the fused SwiGLU, FP8 copies of linear inputs under FP8); not measurable on
  CPU, checked on a GPU by tools/gpu_check.py.

Notation (all per rank): ``s`` tokens of the sequence this rank holds (S / CP), ``s_n`` tokens the
norms and the residual stream hold (s / TP with sequence parallelism, else s), ``b`` micro-batch,
``h`` hidden, ``a``/``g`` query heads / K/V groups of this TP rank, ``d`` head dim, ``r`` rotated dims,
``f`` FFN size of this TP rank, ``V`` vocabulary of this TP rank, ``B`` bytes of the compute dtype.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

from megatron_harpe.planning.hardware import GIB, Assumptions, GPU
from megatron_harpe.planning.spec import Layout, ModelShape, Plan, Workload

INT64, FP32, BOOL = 8, 4, 1
ADAM_MOMENTS = 8  # exp_avg + exp_avg_sq, fp32
MASTER = 4  # fp32 master weight
TORCH_ADAM_STEP = 4  # torch Adam/AdamW's per-parameter "step" (a 0-d fp32 tensor)


# ----------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class Param:
    name: str
    numel: int
    shared_embedding: bool = False
    linear: bool = False  # a GEMM weight (FP8 keeps copies of these)


def chunk_parameters(m: ModelShape, p: Layout, pp_rank: int, vp_chunk: int = 0) -> List[Param]:
    """The parameters of one model chunk on one rank, in ``model.parameters()`` order."""
    t, h = p.tp, m.hidden_size
    vpp = p.vpp or 1
    layers = m.num_layers // (p.pp * vpp)
    pre = pp_rank == 0 and vp_chunk == 0
    post = pp_rank == p.pp - 1 and vp_chunk == vpp - 1
    tied_shared = m.tie_embeddings and p.pp > 1
    params: List[Param] = []
    if pre:
        params.append(Param("embedding.word_embeddings.weight", m.vocab_size // t * h,
                            shared_embedding=m.tie_embeddings))
    qkv = (m.num_attention_heads + 2 * m.num_query_groups) * m.head_dim // t * h
    proj = h * (m.num_attention_heads * m.head_dim // t)
    fc1 = 2 * m.ffn_hidden_size // t * h
    fc2 = h * (m.ffn_hidden_size // t)
    for i in range(layers):
        params += [Param(f"layers.{i}.input_layernorm.weight", h),
                   Param(f"layers.{i}.self_attention.linear_proj.weight", proj, linear=True),
                   Param(f"layers.{i}.self_attention.linear_qkv.weight", qkv, linear=True),
                   Param(f"layers.{i}.pre_mlp_layernorm.weight", h),
                   Param(f"layers.{i}.mlp.linear_fc1.weight", fc1, linear=True),
                   Param(f"layers.{i}.mlp.linear_fc2.weight", fc2, linear=True)]
    if post:
        params.append(Param("decoder.final_layernorm.weight", h))
        if not m.tie_embeddings or tied_shared:
            params.append(Param("output_layer.weight", m.vocab_size // t * h, shared_embedding=tied_shared))
    return params


@dataclass(frozen=True)
class BufferLayout:
    """megatron-core DDP's param-and-grad buffer of one model chunk: where each parameter lives."""

    numel: int  # elements, padding included
    numel_unpadded: int
    buckets: Tuple[Tuple[int, int], ...]  # [start, end) of each bucket
    ranges: Tuple[Tuple[Param, int, int, int], ...]  # (param, start, end, bucket index)


def buffer_layout(params: List[Param], dp_cp: int, dist_opt: bool, bucket_size: Optional[int]) -> BufferLayout:
    """Lay the parameters out as megatron-core 0.16.1's _ParamAndGradBuffer does (our own code, same rules):
    reverse order; with the distributed optimizer each parameter starts at a multiple of 64 elements
    and each bucket ends at a multiple of lcm(dp_cp, 128); a new bucket once `bucket_size` elements are
    collected; a shared embedding weight gets a bucket of its own (distributed optimizer only)."""
    def pad(n: int, k: int) -> int:
        return int(math.ceil(n / k) * k)

    divisor = math.lcm(dp_cp, 128)
    start = bucket_start = 0
    in_bucket = 0
    buckets: List[Tuple[int, int]] = []
    ranges = []
    unpadded = 0
    end = 0

    def close(end_index: int) -> int:
        nonlocal bucket_start, in_bucket, unpadded
        unpadded_here = end_index - bucket_start
        unpadded += unpadded_here
        bucket_end = pad(end_index, divisor) if dist_opt else end_index
        buckets.append((bucket_start, bucket_end))
        bucket_start, in_bucket = bucket_end, 0
        return bucket_end

    for param in reversed(params):
        if dist_opt:
            start = pad(start, 64)
        own_bucket = param.shared_embedding and dist_opt
        if own_bucket and in_bucket:
            start = close(start)
        end = start + param.numel
        ranges.append((param, start, end, len(buckets)))
        in_bucket += 1
        if (bucket_size is not None and end - bucket_start >= bucket_size) or own_bucket:
            start = close(end)
        else:
            start = end
    if in_bucket:
        end = close(end)
    numel = buckets[-1][1] if buckets else 0
    # megatron counts "unpadded" per bucket as (last param end - bucket start): 64-alignment gaps included
    return BufferLayout(numel=numel, numel_unpadded=unpadded, buckets=tuple(buckets), ranges=tuple(ranges))


def shard_elements(layout: BufferLayout, dp_cp: int, rank: int) -> List[Tuple[Param, int]]:
    """(param, elements of it in this rank's shard) under the distributed optimizer: each bucket is
    split into dp_cp equal shards; a parameter's master copy and Adam state cover its overlap."""
    out = []
    for param, start, end, bucket in layout.ranges:
        b0, b1 = layout.buckets[bucket]
        size = (b1 - b0) // dp_cp
        lo, hi = b0 + rank * size, b0 + (rank + 1) * size
        overlap = min(end, hi) - max(start, lo)
        if overlap > 0:
            out.append((param, overlap))
    return out


@dataclass
class ModelState:
    weights: int
    grads: int
    optimizer: int  # master weights + Adam moments + step counters
    master: int
    moments: int
    steps: int
    fp8_weight_copies: int
    params: int  # parameter elements on this rank
    largest_param: int


def model_state(m: ModelShape, p: Layout, w: Workload, pp_rank: int, dp_cp_rank: Optional[int] = None) -> ModelState:
    """Bytes of weights, gradients and optimizer state on one rank of pipeline stage `pp_rank`.

    dp_cp_rank: which distributed-optimizer shard (None = the largest one; shards differ by the
    parameter boundaries only)."""
    dp_cp = p.dp * p.cp
    B = w.dtype_bytes
    weights = grads = 0
    numels = []
    shards: List[List[Tuple[Param, int]]] = [[] for _ in range(dp_cp if p.dist_opt else 1)]
    all_params: List[Param] = []
    fp8_copies = 0
    for chunk in range(p.vpp or 1):
        params = chunk_parameters(m, p, pp_rank, chunk)
        all_params += params
        bucket_size = None
        if p.overlap_grad_reduce and pp_rank == 0 and chunk == 0:
            bucket_size = max(40_000_000, 1_000_000 * p.dp)
        layout = buffer_layout(params, dp_cp, p.dist_opt, bucket_size)
        grads += layout.numel * FP32
        weights += (layout.numel if p.dist_opt else sum(q.numel for q in params)) * B
        if p.dist_opt:
            for r in range(dp_cp):
                shards[r] += shard_elements(layout, dp_cp, r)
        numels += [q.numel for q in params]
        if w.fp8:
            fp8_copies += 2 * sum(q.numel for q in _fp8_linear_params(m, p, w, pp_rank, chunk, params))
    if p.dist_opt:
        sizes = [sum(n for _, n in shard) for shard in shards]
        pick = sizes.index(max(sizes)) if dp_cp_rank is None else dp_cp_rank
        owned = shards[pick]
    else:
        owned = [(q, q.numel) for q in all_params]
    elements = sum(n for _, n in owned)
    master = elements * MASTER if B != 4 else 0  # fp32 weights are their own master copy
    moments = elements * ADAM_MOMENTS
    steps = len(owned) * TORCH_ADAM_STEP if w.backend == "local" else 0  # TE's FusedAdam: one step per group
    return ModelState(weights=weights, grads=grads, optimizer=master + moments + steps, master=master,
                      moments=moments, steps=steps, fp8_weight_copies=fp8_copies, params=sum(numels),
                      largest_param=max(numels) if numels else 0)


def _fp8_linear_params(m: ModelShape, p: Layout, w: Workload, pp_rank: int, chunk: int, params: List[Param]):
    first, last = w.fp8_bf16_layers
    offset = _first_layer_of_chunk(m, p, pp_rank, chunk)
    for q in params:
        if not q.linear:
            continue
        i = offset + int(q.name.split(".")[1])
        if first <= i < m.num_layers - last:
            yield q


def _first_layer_of_chunk(m: ModelShape, p: Layout, pp_rank: int, chunk: int) -> int:
    per_chunk = m.num_layers // (p.pp * (p.vpp or 1))
    return (chunk * p.pp + pp_rank) * per_chunk


# ----------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class Sizes:
    """The per-rank sizes every activation term is written in (see the module doc)."""

    S: int
    s: int
    s_n: int
    b: int
    h: int
    a: int
    g: int
    d: int
    r: int
    f: int
    V: int
    B: int
    cp: int
    tp: int

    @classmethod
    def of(cls, m: ModelShape, p: Layout, w: Workload) -> "Sizes":
        s = w.seq_length // p.cp
        return cls(S=w.seq_length, s=s, s_n=s // p.tp if p.sequence_parallel else s, b=w.micro_batch,
                   h=m.hidden_size, a=m.num_attention_heads // p.tp, g=m.num_query_groups // p.tp, d=m.head_dim,
                   r=m.rot_dim, f=m.ffn_hidden_size // p.tp, V=m.vocab_size // p.tp, B=w.dtype_bytes, cp=p.cp,
                   tp=p.tp)


def layer_activations(m: ModelShape, p: Layout, w: Workload, fp8_layer: bool = False,
                      cp_rank: Optional[int] = None) -> Dict[str, float]:
    """Bytes autograd keeps for one transformer layer and one micro-batch, by part (no full recompute).

    cp_rank: which context-parallel rank (only the CPU attention's masks differ by rank; None = the
    largest)."""
    z = Sizes.of(m, p, w)
    sel = set(p.selective_modules)
    out: Dict[str, float] = {}
    B, s, s_n, b = z.B, z.s, z.s_n, z.b
    # rotary: megatron-core's unfused apply keeps cos and sin of the angles, in the compute dtype, for q
    # and for k. HARPE's angles are per head ([s, 1, heads, r]); one-base RoPE's are [s, 1, 1, r].
    if w.rope_kernel == "unfused":
        heads = (z.a + z.g) if m.position == "harpe" else 2
        out["rotary cos/sin"] = 2 * B * s * z.r * heads
    if w.backend == "local":
        norm = (FP32 + 2 * B) * s_n * b * z.h + FP32 * s_n * b  # x in fp32, normalised x, output; rsqrt
        out["norms"] = 2 * norm
        q, k = B * s * b * z.a * z.d, B * s * b * z.g * z.d
        qkv = B * s * b * (z.a + 2 * z.g) * z.d
        o = B * s * b * z.a * z.d
        lse = FP32 * b * z.a * s
        if "core_attn" in sel:  # the checkpoint keeps q, k, v (a view of the QKV output) and its output
            out["attention"] = q + k + qkv + o + 4
        elif z.cp == 1:  # SDPA: q, k, v (its storage: the whole QKV output), out, logsumexp
            out["attention"] = q + k + qkv + o + lse
        else:  # K/V all-gathered over CP and kept: O(S) per rank; two query chunks -> outputs + concatenation
            c = z.S // (2 * z.cp)
            attn = q + B * z.S * b * 2 * z.g * z.d + INT64 * z.S + 2 * o + lse
            if w.device == "cpu":
                # the lower-right causal masks of the two query chunks (global chunks r and 2cp-1-r see
                # (j + 1) c keys), kept by SDPA in the compute dtype; chunk 0 needs none (plain causal)
                r = 1 if cp_rank is None else cp_rank
                attn += B * c * c * ((r + 1 if r > 0 else 0) + (2 * z.cp - r))
            elif z.a != z.g:
                attn += 2 * B * b * z.a * z.d * (2 * z.cp + 1) * c  # K/V prefixes expanded to the query heads
            out["attention"] = attn
        if "mlp" not in sel:  # fc1 output, silu(gate), up (+0 offset), their product; fused SwiGLU: 3f
            out["mlp"] = (3 if w.device == "gpu" else 5) * B * s * b * z.f
    else:
        Bq = 1 if fp8_layer else B
        ln = B * s_n * b * z.h + Bq * s_n * b * z.h + FP32 * s_n * b  # input, normalised input, rsigma
        out["norms"] = ln  # attention side
        q, k, v = B * s * b * z.a * z.d, B * s * b * z.g * z.d, B * s * b * z.g * z.d
        o = B * s * b * z.a * z.d
        lse = FP32 * b * z.a * s
        if "core_attn" in sel:
            qkv = B * s * b * (z.a + 2 * z.g) * z.d
            attn = q + k + qkv + o
        elif w.fp8_dot_product_attention and fp8_layer:
            attn = (q + k + v + o) // B + lse
        else:
            attn = q + k + v + o + lse
        if fp8_layer:
            attn += s * b * z.a * z.d  # linear_proj keeps an FP8 copy of its input
        out["attention"] = attn
        if "mlp" in sel:
            out["norms"] += B * s_n * b * z.h  # the MLP checkpoint keeps its (pre-norm) input only
        else:
            out["norms"] += ln
            out["mlp"] = 2 * B * s * b * z.f + Bq * s * b * z.f  # fc1 output (fused SwiGLU), fc2 input
    if w.hidden_dropout > 0:
        out["dropout masks"] = 2 * BOOL * s_n * b * z.h
    return out


def checkpoint_bytes(m: ModelShape, p: Layout, w: Workload) -> float:
    """What full recompute keeps per checkpointed chunk: its input hidden states."""
    z = Sizes.of(m, p, w)
    return z.B * z.s_n * z.b * z.h


def embedding_activations(m: ModelShape, p: Layout, w: Workload) -> float:
    """Token ids kept by the embedding's backward; with TP the vocab-parallel embedding also keeps the
    mask of ids outside this rank's vocabulary slice."""
    z = Sizes.of(m, p, w)
    return INT64 * z.b * z.s + (BOOL * z.b * z.s if p.tp > 1 else 0)


def output_activations(m: ModelShape, p: Layout, w: Workload) -> Dict[str, float]:
    """Final norm, output layer input and the loss (last stage, one micro-batch)."""
    z = Sizes.of(m, p, w)
    if w.backend == "local":
        norm = (FP32 + 2 * z.B) * z.s_n * z.b * z.h + FP32 * z.s_n * z.b
    else:
        norm = 2 * z.B * z.s_n * z.b * z.h + FP32 * z.s_n * z.b
    # vocab-parallel cross entropy keeps the softmax in fp32, a target mask and the masked targets
    loss = FP32 * z.s * z.b * z.V + BOOL * z.s * z.b + INT64 * z.s * z.b
    return {"final norm": norm, "logits (fp32 softmax)": loss}


def in_flight(p: Layout, pp_rank: int, num_microbatches: int) -> int:
    """Model-chunk micro-batches whose activations stage `pp_rank` holds at its peak (1F1B schedules).

    Non-interleaved: min(PP - rank, m). Interleaved (VPP chunks): megatron-core's warm-up
    2(PP - rank - 1) + (VPP - 1) PP, plus the one in the steady state, at most m x VPP."""
    if p.pp == 1:
        return 1
    if not p.vpp:
        return min(p.pp - pp_rank, num_microbatches)
    return min(2 * (p.pp - pp_rank - 1) + (p.vpp - 1) * p.pp + 1, num_microbatches * p.vpp)


def chunk_layer_activations(plan: Plan, pp_rank: int, chunk: int, cp_rank: Optional[int] = None) -> Dict[str, float]:
    """What the transformer layers of one model chunk keep for one micro-batch, by part (full recompute:
    the checkpointed chunk inputs instead of the layers' own tensors)."""
    m, p, w = plan.model, plan.layout, plan.workload
    per_chunk = m.num_layers // (p.pp * (p.vpp or 1))
    start = _first_layer_of_chunk(m, p, pp_rank, chunk)
    n = p.recompute_num_layers or 1
    uniform = (p.recompute_method or "uniform") == "uniform"
    parts: Dict[str, float] = {}
    for i in range(start, start + per_chunk):
        if p.recompute == "full" and ((uniform and (i - start) % n == 0) or (not uniform and i - start < n)):
            parts["checkpointed layer inputs"] = parts.get("checkpointed layer inputs", 0) + checkpoint_bytes(m, p, w)
        if p.recompute == "full" and (uniform or i - start < n):
            continue
        fp8_layer = bool(w.fp8) and w.fp8_bf16_layers[0] <= i < m.num_layers - w.fp8_bf16_layers[1]
        for key, value in layer_activations(m, p, w, fp8_layer, cp_rank).items():
            parts[key] = parts.get(key, 0) + value
    return parts


def microbatch_activations(plan: Plan, pp_rank: int, chunk: int, cp_rank: Optional[int] = None) -> float:
    """Bytes autograd keeps for one micro-batch through one model chunk (what measure.py counts)."""
    m, p, w = plan.model, plan.layout, plan.workload
    total = sum(chunk_layer_activations(plan, pp_rank, chunk, cp_rank).values())
    if pp_rank == 0 and chunk == 0:
        total += embedding_activations(m, p, w)
    if pp_rank == p.pp - 1 and chunk == (p.vpp or 1) - 1:
        total += sum(output_activations(m, p, w).values())
    return total


# ----------------------------------------------------------------------------- the report
@dataclass
class Item:
    name: str
    bytes: float
    group: str  # model state | activations | buffers | transient | allowance
    how: str
    exact: bool = False

    @property
    def gib(self) -> float:
        return self.bytes / GIB


@dataclass
class StageMemory:
    pp_rank: int
    items: List[Item] = field(default_factory=list)

    def add(self, name: str, nbytes: float, group: str, how: str, exact: bool = False) -> None:
        if nbytes:
            self.items.append(Item(name, float(nbytes), group, how, exact))

    def sum(self, *groups: str) -> float:
        return sum(i.bytes for i in self.items if i.group in groups)

    @property
    def allocated(self) -> float:
        """What torch.cuda.max_memory_allocated() should show at the step's peak."""
        return self.sum("model state", "activations", "buffers", "transient")

    @property
    def total(self) -> float:
        return self.allocated + self.sum("allowance")

    def to_dict(self) -> dict:
        return {"pp_rank": self.pp_rank, "allocated_gib": self.allocated / GIB, "total_gib": self.total / GIB,
                "items": [dict(asdict(i), gib=i.gib) for i in self.items]}


def num_microbatches(p: Layout, w: Workload) -> int:
    return max(w.global_batch // (w.micro_batch * p.dp), 1)


def stage_memory(plan: Plan, pp_rank: int, assumptions: Assumptions = Assumptions()) -> StageMemory:
    """Every memory item of one GPU of pipeline stage `pp_rank`."""
    m, p, w = plan.model, plan.layout, plan.workload
    z = Sizes.of(m, p, w)
    mem = StageMemory(pp_rank)
    st = model_state(m, p, w, pp_rank)
    dtype = {2: "bf16", 4: "fp32"}[w.dtype_bytes]
    mem.add("weights", st.weights, "model state",
            f"{st.params:,} parameters x {w.dtype_bytes} B ({dtype})" + (" in DDP's padded buffer" if p.dist_opt else ""),
            exact=True)
    mem.add("gradients", st.grads, "model state", "fp32 main_grad buffer (grad_reduce_in_fp32)", exact=True)
    shard = f"sharded over DP x CP = {p.dp * p.cp}" if p.dist_opt else "not sharded"
    mem.add("optimizer: fp32 master weights", st.master, "model state", shard, exact=True)
    mem.add("optimizer: Adam moments", st.moments, "model state", f"exp_avg + exp_avg_sq fp32, {shard}", exact=True)
    mem.add("optimizer: step counters", st.steps, "model state", "torch AdamW: one fp32 step per parameter",
            exact=True)
    mem.add("FP8 weight copies", st.fp8_weight_copies, "model state",
            "Transformer Engine keeps FP8 weights and their transposes (1 B + 1 B) for the FP8 layers")

    mbs = num_microbatches(p, w)
    vpp = p.vpp or 1
    flight = in_flight(p, pp_rank, mbs)
    first_stage, last_stage = pp_rank == 0, pp_rank == p.pp - 1
    # the peak is at the start of the backward of the last chunk's micro-batch: `flight` chunk-micro-batches
    # held; chunk 0 stands for all (they have the same layers); token ids and logits counted once each
    layers = chunk_layer_activations(plan, pp_rank, 0)
    how_layers = f"{m.num_layers // (p.pp * vpp)} layers x {flight} micro-batch(es) in flight"
    for key, value in layers.items():
        mem.add(f"activations: {key}", value * flight, "activations", how_layers)
    if first_stage:
        mem.add("activations: token ids", embedding_activations(m, p, w) * min(flight, mbs), "activations",
                "int64 ids kept by the embedding")
    if last_stage:
        for key, value in output_activations(m, p, w).items():
            mem.add(f"activations: {key}", value, "activations",
                    "one micro-batch; vocab-parallel" + (f" (V/TP = {z.V})" if p.tp > 1 else ""))
    if p.pp > 1:
        held = (0 if first_stage else 1) + (0 if last_stage else 1)
        if w.backend == "local" and w.dtype_bytes == 4 and not first_stage:
            held -= 1  # fp32: the first norm keeps the received tensor itself
        elif w.backend == "te" and not first_stage:
            held -= 1  # TE's LayerNormLinear keeps its input itself
        mem.add("pipeline send/receive tensors", held * flight * z.B * z.s_n * z.b * z.h, "activations",
                "stage input/output kept by the schedule for each micro-batch in flight")
    if p.recompute == "full":
        n = (p.recompute_num_layers or 1) if (p.recompute_method or "uniform") == "uniform" else 1
        full_layer = max(sum(layer_activations(m, p, w, fp8).values()) for fp8 in {False, bool(w.fp8)})
        mem.add("recompute working set", n * full_layer, "transient",
                f"the {n} layer(s) recomputed at once during backward, all their activations")

    # persistent buffers
    if w.rope_kernel == "unfused" or m.position != "harpe":
        heads = z.g if m.position == "harpe" else 1
        mem.add("rotary angle table", vpp * FP32 * z.s * heads * z.r, "buffers",
                f"[s/CP, 1, {'groups/TP' if m.position == 'harpe' else '1'}, rot_dim] fp32, cached by the rotary "
                f"module, shared by the layers of a chunk")
    if p.sequence_parallel and w.backend == "local":
        mem.add("SP all-gather buffer", z.B * z.s * z.b * z.h, "buffers",
                "megatron-core's global 'mpu' buffer for the gathered linear inputs")

    # transients at the peak (start of the backward pass of the last micro-batch)
    logits = z.B * z.s * z.b * z.V if (last_stage and z.B != 4) else 0.0
    param_grad = st.largest_param * z.B if (w.backend == "local" or w.device == "cpu") else 0.0
    backward = z.B * z.s * z.b * (3 * z.f + 2 * z.h)
    if p.cp > 1:
        kv_full = z.B * z.S * z.b * 2 * z.g * z.d
        kv_local = kv_full // p.cp
        if w.backend == "local" or p.cp_comm == "all_gather":
            backward += kv_full
        else:
            backward += 2 * kv_local
    transient = max(logits + param_grad, backward)
    mem.add("transient buffers", transient, "transient",
            "max(compute-dtype logits + one weight's gradient, backward working set ~ B*s*b*(3f + 2h)"
            + (" + CP K/V buffers" if p.cp > 1 else "") + ")")

    variable = mem.sum("activations", "transient")
    mem.add("fragmentation allowance", assumptions.fragmentation * variable, "allowance",
            f"{assumptions.fragmentation:.0%} of activations and transients")
    mem.add("reserve", assumptions.reserve_gib * GIB, "allowance",
            "CUDA context, NCCL buffers, cuBLAS/TE workspaces (not seen by max_memory_allocated)")
    return mem


def plan_memory(plan: Plan, assumptions: Assumptions = Assumptions()) -> List[StageMemory]:
    """The stages worth reporting: the first (most micro-batches in flight) and the last (logits)."""
    ranks = [0] if plan.layout.pp == 1 else [0, plan.layout.pp - 1]
    return [stage_memory(plan, r, assumptions) for r in ranks]


def peak_stage(stages: List[StageMemory]) -> StageMemory:
    return max(stages, key=lambda s: s.total)


def fits(stages: List[StageMemory], gpu: GPU) -> Tuple[bool, float]:
    """(fits, headroom in bytes: negative = short by that much)."""
    peak = peak_stage(stages)
    headroom = gpu.memory_bytes - peak.total
    return headroom >= 0, headroom
