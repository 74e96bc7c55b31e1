"""Worker: a tiny Llama-style HARPE model (GQA: 4 query heads, 2 K/V groups) in several
parallel layouts, each compared with the same model at TP=PP=CP=DP=1.

Every rank first builds the reference model (TP=1, PP=1), takes its weights, one forward and
one backward on the full batch. Then each layout is set up with megatron-core's
parallel_state, the reference weights are sharded into it, and one training step's forward
and backward runs through megatron-core's forward-backward schedule, DDP wrapper and
finalize_model_grads — the real training path. Per-token losses, logits and gradients are
compared with the reference slice this rank should hold.

Negative controls break HARPE's slicing on purpose (a TP rank using the other rank's bases, a
CP rank using unbalanced positions) and record that the comparison then fails, proving the
checks can see such bugs.

Usage (under torchrun): parallel_equivalence.py --out DIR --scenarios a,b,c
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
from functools import partial

from megatron_harpe.backends import setup_backend

setup_backend()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig  # noqa: E402
from megatron.core.distributed.finalize_model_grads import finalize_model_grads  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed  # noqa: E402

from megatron_harpe.config.model import ModelConfig, PositionEmbeddingConfig  # noqa: E402
from megatron_harpe.models.transformer_config import build_transformer_config  # noqa: E402
from megatron_harpe.models.provider import build_model  # noqa: E402
from tests.sharding import load_full_state_dict, local_parameters, shard_full_tensors  # noqa: E402
from megatron_harpe.rope.harpe_rotary import context_parallel_positions, inverse_frequencies  # noqa: E402

SEQ, BATCH, VOCAB = 32, 2, 128


def model_config(num_layers: int = 2) -> ModelConfig:
    return ModelConfig(num_layers=num_layers, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                       num_query_groups=2, vocab_size=VOCAB, max_position_embeddings=SEQ,
                       position=PositionEmbeddingConfig(kind="harpe", bases=[10000.0, 1_000_000.0]))


def set_layout(tp=1, pp=1, cp=1):
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 context_parallel_size=cp)
    model_parallel_cuda_manual_seed(1234)


def make_batch():
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


# --------------------------------------------------------------------------- reference
def reference(num_layers: int):
    set_layout()
    cfg = model_config(num_layers)
    model = build_model(cfg, build_transformer_config(cfg))
    # identical weights on every rank, whatever each rank's RNG did
    for p in model.parameters():
        dist.broadcast(p.data, src=0)
    full_state = {name: p.detach().clone() for name, p in model.named_parameters()}
    tokens, labels = make_batch()
    logits = model(tokens, None, None).detach()  # [b, s, vocab]
    losses = model(tokens, None, None, labels=labels)  # [b, s]
    losses.mean().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    return dict(state=full_state, logits=logits, losses=losses.detach(), grads=grads)


# --------------------------------------------------------------------------- one layout
def run_layout(ref, *, tp=1, pp=1, cp=1, sp=False, num_layers=2, microbatches=1, tamper=None, kernel="unfused"):
    set_layout(tp, pp, cp)
    cfg = model_config(num_layers)
    tcfg = build_transformer_config(cfg, tensor_parallel=tp, pipeline_parallel=pp, context_parallel=cp,
                                    sequence_parallel=sp)
    tp_rank = ps.get_tensor_model_parallel_rank()
    model = build_model(cfg, tcfg, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                        rope_kernel=kernel)
    load_full_state_dict(model, ref["state"], tp_rank, tp)
    if tamper is not None:
        tamper(model)
    ddp = DistributedDataParallel(tcfg, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    tcfg.finalize_model_grads_func = finalize_model_grads
    tcfg.no_sync_func = ddp.no_sync

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    cp_rank = ps.get_context_parallel_rank()
    positions = context_parallel_positions(SEQ, cp, cp_rank)
    tokens, labels = make_batch()
    rows = torch.arange(BATCH)[dp_rank::dp_size]  # this DP rank's samples
    micro_rows = rows.chunk(microbatches)
    batches = iter([(tokens[r][:, positions], labels[r][:, positions]) for r in micro_rows])
    seen = {"losses": [], "logits": []}

    def loss_func(local_losses):
        seen["losses"].append(local_losses.detach())
        # local sum / tokens of the whole CP group: megatron multiplies by cp and DDP averages over dp*cp
        return local_losses.sum() / (local_losses.numel() * cp), {}

    def forward_step(data_iterator, module):
        tok, lab = next(data_iterator)
        if ps.is_pipeline_last_stage():
            with torch.no_grad():
                seen["logits"].append(module(tok, None, None).detach())
        return module(tok, None, None, labels=lab), loss_func

    ddp.zero_grad_buffer()
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=batches, model=[ddp],
                                num_microbatches=microbatches, seq_length=SEQ // cp,
                                micro_batch_size=len(micro_rows[0]), forward_only=False)
    # the schedule has called finalize_model_grads (DP/CP reduce, SP norm-grad all-reduce)

    rope = model.rotary_pos_emb
    if rope.fused:  # what the layers get: this rank's groups' inverse frequencies, no table
        verdict = {"local_groups": rope.inv_freq.shape[0], "fused_output_shape": list(rope(SEQ).shape)}
    else:
        q_angles, k_angles = rope.query_and_key_angles(rope(SEQ))
        # only this rank's slice exists: its K/V groups (TP) and its positions (CP)
        verdict = {"local_groups": rope.inv_freq.shape[0], "k_angle_shape": list(k_angles.shape),
                   "q_angle_shape": list(q_angles.shape)}
    if ps.is_pipeline_last_stage():
        ref_losses = ref["losses"][rows][:, positions]
        losses = torch.cat(seen["losses"])
        verdict["loss_max_diff"] = (losses - ref_losses).abs().max().item()
        vocab_shard = torch.arange(VOCAB).chunk(tp)[tp_rank]  # parallel_output: vocab-sharded logits
        ref_logits = ref["logits"][rows][:, positions][..., vocab_shard]
        verdict["logit_max_diff"] = (torch.cat(seen["logits"]) - ref_logits).abs().max().item()
    expected = shard_full_tensors(model, ref["grads"], tp_rank, tp)
    diffs = {glob: (param.main_grad - expected[glob]).abs().max().item() for _, glob, param in local_parameters(model)}
    verdict["grad_diffs"] = diffs
    verdict["grad_max_diff"] = max(diffs.values())
    verdict["grad_worst_param"] = max(diffs, key=diffs.get)
    verdict["grad_scale"] = max(t.abs().max().item() for t in expected.values())
    verdict["num_params_checked"] = len(diffs)
    return verdict


# --------------------------------------------------------------------------- tampering
def use_other_ranks_bases(model):
    """Negative control: this TP rank rotates with the other rank's K/V-group bases."""
    rope = model.rotary_pos_emb
    other = [b for b in rope.bases if b not in rope.local_bases]
    rope.inv_freq = inverse_frequencies(other, rope.dim)
    rope._cache_key = None


def use_unbalanced_cp_positions(model):
    """Negative control: this CP rank takes contiguous positions instead of chunks r and 2cp-1-r."""
    rope = model.rotary_pos_emb
    original = rope._angles_for_positions
    cp_size, cp_rank = rope.cp_group.size(), rope.cp_group.rank()

    def contiguous(positions):
        n = positions.numel()
        return original(torch.arange(cp_rank * n, (cp_rank + 1) * n) if n * cp_size == SEQ else positions)

    rope._angles_for_positions = contiguous
    rope._cache_key = None


def equal_bases_match_megatron_rope(ref):
    """HARPE with every base equal to b must be bit-identical to megatron-core's RoPE with base b."""
    set_layout()
    base = 500000.0
    harpe_cfg = model_config()
    harpe_cfg.position = PositionEmbeddingConfig(kind="harpe", bases=[base, base])
    rope_cfg = model_config()
    rope_cfg.position = PositionEmbeddingConfig(kind="rope", base=base)
    logits = []
    for cfg in (harpe_cfg, rope_cfg):
        model = build_model(cfg, build_transformer_config(cfg))
        load_full_state_dict(model, ref["state"], 0, 1)
        tokens, _ = make_batch()
        logits.append(model(tokens, None, None).detach())
    return {"bit_identical": bool(torch.equal(logits[0], logits[1])),
            "max_diff": (logits[0] - logits[1]).abs().max().item(),
            # and the reference (bases 1e4, 1e6) is not that model: the bases matter here
            "differs_from_harpe_reference": (logits[1] - ref["logits"]).abs().max().item()}


def packed_documents_equal_separate_forwards(ref, cp: int, kernel: str = "unfused"):
    """Packed (THD) documents through GPTModel: each document's logits equal a forward of that
    document alone, so HARPE positions restart at 0 per document — also under CP, where each
    document is split into 2*cp chunks."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron_harpe.parallel.core_attention import cp_local_positions

    lengths = [8, 16, 8]
    starts = [0, 8, 24]
    set_layout(cp=cp)
    cfg = model_config()
    model = build_model(cfg, build_transformer_config(cfg, context_parallel=cp), rope_kernel=kernel)
    load_full_state_dict(model, ref["state"], 0, 1)
    tokens, _ = make_batch()
    packed = tokens[0]  # 32 tokens, cut into documents of 8, 16 and 8
    cu = torch.tensor([0, 8, 24, 32], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=max(lengths), max_seqlen_kv=max(lengths))
    cp_rank = ps.get_context_parallel_rank()
    local = cp_local_positions([(st, n, n) for st, n in zip(starts, lengths)], cp, cp_rank, SEQ // cp)
    with torch.no_grad(), recording_rotations() as rotations:
        packed_logits = model(packed[local][None, :], None, None, packed_seq_params=params)
        # separate forwards at CP=1 on the same weights
        set_layout()
        single = build_model(cfg, build_transformer_config(cfg))
        load_full_state_dict(single, ref["state"], 0, 1)
        separate = torch.cat([single(packed[st:st + n][None, :], None, None)[0] for st, n in zip(starts, lengths)])
    diff = (packed_logits.reshape(len(local), -1) - separate[local]).abs().max().item()
    # positions that did NOT restart would be a different model: a one-document pack differs
    unpacked = ref["logits"][0][local]
    # Logits cannot tell positions shifted by a constant (RoPE scores depend on distances only), so
    # the rotation applied to the first layer's queries is checked against each token's position
    # inside its own document, computed here from the document starts.
    if kernel == "fused":  # the kernel rotates inside the attention; its positions are checked in test_fused_rope
        return {"max_diff": diff,
                "differs_from_unpacked": (packed_logits.reshape(len(local), -1) - unpacked).abs().max().item()}
    query_in, query_out = rotations[0]
    doc_start = torch.repeat_interleave(torch.tensor(starts), torch.tensor(lengths))
    in_document = local - doc_start[local]
    bases = cfg.position.bases
    return {"max_diff": diff, "differs_from_unpacked": (packed_logits.reshape(len(local), -1) - unpacked).abs().max().item(),
            "rotation_vs_document_positions": (query_out - rotate_per_group(query_in, in_document, bases)).abs().max().item(),
            "rotation_vs_shifted_positions": (query_out - rotate_per_group(query_in, in_document + 3, bases)).abs().max().item()}


@contextlib.contextmanager
def recording_rotations():
    """Record (input, output) of every packed-sequence RoPE application in megatron-core's attention."""
    import megatron.core.transformer.attention as attention

    original, calls = attention.apply_rotary_pos_emb, []

    def record(t, freqs, *args, **kwargs):
        out = original(t, freqs, *args, **kwargs)
        if kwargs.get("cu_seqlens") is not None:
            calls.append((t.detach().clone(), out.detach().clone()))
        return out

    attention.apply_rotary_pos_emb = record
    try:
        yield calls
    finally:
        attention.apply_rotary_pos_emb = original


def rotate_per_group(t, positions, bases):
    """Independent rotate-half RoPE of t [tokens, heads, dim]: head h uses the base of its K/V group."""
    tokens, heads, dim = t.shape
    half = dim // 2
    per_group = heads // len(bases)
    theta = torch.tensor([[b ** (-2.0 * j / dim) for j in range(half)] for b in bases], dtype=torch.float64)
    angle = positions.double()[:, None, None] * theta.repeat_interleave(per_group, dim=0)[None]  # [t, h, half]
    x1, x2 = t.double()[..., :half], t.double()[..., half:]
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], dim=-1)


def checkpoint_tp2_to_tp1(ref, out_dir: str):
    """Save at TP=2 with megatron-core dist_checkpointing, load at TP=1: same logits; the base
    set travels in the checkpoint and a different configured base set is refused."""
    from megatron_harpe.models.checkpoint import load_model, read_common_state, save_model

    directory = os.path.join(out_dir, "ckpt_tp2")
    set_layout(tp=2)
    cfg = model_config()
    model = build_model(cfg, build_transformer_config(cfg, tensor_parallel=2))
    load_full_state_dict(model, ref["state"], ps.get_tensor_model_parallel_rank(), 2)
    save_model([model], cfg, directory)
    set_layout()
    restored = build_model(cfg, build_transformer_config(cfg))
    common = load_model([restored], cfg, directory)
    tokens, _ = make_batch()
    with torch.no_grad():
        diff = (restored(tokens, None, None) - ref["logits"]).abs().max().item()
    other = model_config()
    other.position = PositionEmbeddingConfig(kind="harpe", bases=[10000.0, 2_000_000.0])
    try:
        load_model([build_model(other, build_transformer_config(other))], other, directory)
        refusal = ""
    except ValueError as err:
        refusal = str(err)
    from megatron.core.dist_checkpointing import load_tensors_metadata

    saved_keys = sorted(load_tensors_metadata(directory).keys())
    return {"max_diff": diff, "saved_keys": saved_keys,
            "saved_bases": common["megatron_harpe_position_embedding"]["bases"],
            "bases_on_disk": read_common_state(directory)["megatron_harpe_position_embedding"]["bases"],
            "refusal": refusal, "no_staging_left": not os.path.exists(os.path.join(out_dir, ".ckpt_tp2.incomplete"))}


def position_kinds_build_and_run(ref):
    """Every position scheme builds through the provider and runs forward/backward on CPU;
    PI is RoPE at positions divided by the factor (checked through the rotary modules)."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding
    from megatron_harpe.rope.harpe_rotary import HarpeRotaryEmbedding

    set_layout()
    kinds = {
        "rope": PositionEmbeddingConfig(kind="rope", base=5e6),
        "pi": PositionEmbeddingConfig(kind="pi", base=1e4, interpolation_factor=4.0),
        "yarn": PositionEmbeddingConfig(kind="yarn", base=1e4, yarn_factor=4.0,
                                        yarn_original_max_position_embeddings=8),
        "harpe": PositionEmbeddingConfig(kind="harpe", bases=[1e4, 1e6]),
    }
    out = {}
    tokens, labels = make_batch()
    for kind, position in kinds.items():
        cfg = model_config()
        cfg.position = position
        model = build_model(cfg, build_transformer_config(cfg))
        load_full_state_dict(model, ref["state"], 0, 1)
        loss = model(tokens, None, None, labels=labels).mean()
        loss.backward()
        out[kind] = {"loss": loss.item(), "module": type(model.rotary_pos_emb).__name__,
                     "grads_finite": all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())}
        if kind == "pi":
            rope = model.rotary_pos_emb
            scaled = rope.get_freqs_non_repeated(SEQ)
            plain = torch.outer(torch.arange(SEQ, dtype=torch.float32) / 4.0, rope.inv_freq)
            out[kind]["pi_positions_scaled"] = bool(torch.allclose(scaled, plain))
    out["types_ok"] = (out["harpe"]["module"] == HarpeRotaryEmbedding.__name__
                       and out["yarn"]["module"] == YarnRotaryEmbedding.__name__)
    return out


SCENARIOS = {
    "tp2": dict(tp=2),
    "tp2_sp": dict(tp=2, sp=True),
    "pp2": dict(pp=2, microbatches=2),
    "cp2": dict(cp=2),
    "dp2": dict(),
    "tp2_wrong_bases": dict(tp=2, tamper=use_other_ranks_bases),
    "cp2_wrong_positions": dict(cp=2, tamper=use_unbalanced_cp_positions),
    # four ranks
    "tp2_pp2": dict(tp=2, pp=2, microbatches=2),
    "tp2_cp2": dict(tp=2, cp=2),
    "cp2_dp2": dict(cp=2),
    "tp2_cp2_fused": dict(tp=2, cp=2, kernel="fused"),  # HARPE's Triton kernel (interpreted on CPU)
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--scenarios", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.use_deterministic_algorithms(True)
    ref = reference(num_layers=2)
    results = {}
    for name in args.scenarios.split(","):
        if name == "equal_bases_vs_rope":
            results[name] = equal_bases_match_megatron_rope(ref)
        elif name == "position_kinds":
            results[name] = position_kinds_build_and_run(ref)
        elif name == "checkpoint_tp2_to_tp1":
            results[name] = checkpoint_tp2_to_tp1(ref, args.out)
        elif name.startswith("thd_packed_cp"):
            kernel = "fused" if name.endswith("_fused") else "unfused"
            results[name] = packed_documents_equal_separate_forwards(ref, cp=int(name.split("_")[2][2]),
                                                                     kernel=kernel)
        else:
            results[name] = run_layout(ref, **SCENARIOS[name])
    ps.destroy_model_parallel()
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
