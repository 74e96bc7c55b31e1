"""One script that proves the GPU path the moment a GPU is lent (docs/gpu_check.md).

    PYTHONUNBUFFERED=1 python tools/gpu_check.py --out gpu_check_out           # a GPU: ~5-8.5 minutes
    python tools/gpu_check.py --cpu --out /tmp/gc                              # CPU: correctness only, < 60 s

Sections, run in the order a b c d e f j g h i (each runs on its own: a failing one is recorded with its
traceback and the next one runs; each has a time cap, and the part of a section left when its cap is reached
is skipped and recorded; j runs before g and h, the sections the run's budget cuts first):
  a  environment: GPU, memory, compute capability, driver/CUDA, torch, triton, megatron-core, TE,
     whether SDPA's flash backend runs bf16 causal attention at head dim 128
  b  HARPE rotary on the device: HarpeRotaryEmbedding tables + megatron-core's
     _apply_rotary_pos_emb_bshd, and the fused Triton kernel, against float64 references (fp32, bf16,
     forward and gradients); equal bases give megatron-core's RotaryEmbedding table bit for bit
  c  CP slicing: megatron-core's get_pos_emb_on_this_cp_rank on the full HARPE table == the rotary
     module's own per-rank table, cp 2/4/8, every rank; the fused kernel's CP positions agree
  d  SDPA core attention (parallel/core_attention.py) at 32k and 128k tokens, causal and the
     lower-right CP-chunk case, flash backend forced: time, peak memory; correctness vs the math backend
  e  one Llama-2-7B-shaped layer (project spec), fwd+bwd at 32k: one-base RoPE, HARPE table, HARPE fused
  f  harpe-train on one GPU: ~100M HARPE model, distributed optimizer + overlaps, 30 iterations; the same
     run stopped by SIGTERM after 15 and resumed must give the same loss trace; tokens/s and MFU
  g  the fused-RoPE benchmark (tools/bench_rope.py) at 32k and 128k tokens
  h  harpe-plan's memory model vs one GPU step: a Llama-2-7B-width model cut to 4 layers, seq 16k and 32k,
     plain / distributed optimizer / full / selective recompute, fused and unfused HARPE RoPE
     (planning/measure.py in a world of one): weights, gradients, optimizer state, saved activations and
     torch.cuda.max_memory_allocated over the second step, each measured / planned
  i  two-rank layouts vs one rank (2+ GPUs, NCCL; in CPU mode 2 gloo ranks; one GPU: skipped): TP=2 + SP,
     CP=2 with each cp_comm_type Transformer Engine allows here (config/combinations.py), packed documents
     at CP=2, FP8 attention at CP=2 (sm89+); loss and every gradient against the TP=PP=CP=1 model on the
     same batch and weights, and a negative control that must be seen (i_worker.py under torchrun)
  j  harpe-preflight on the paper's config twin (examples/llama2_7b_harpe_128k.yaml, mock data, no initial
     checkpoint, --gpus 32): one process at TP = CP = 1 on one GPU, torchrun at TP = min(8, GPUs) + SP with 2+;
     again with fp8.format=hybrid on sm89+ with Transformer Engine; each preflight check a check here ("not
     run" ones notes), exit code, preflight.json / preflight.md (copied to <out>/preflight*/), wall time.
     CPU mode: skipped, covered by tests/test_preflight.py on CPU (gloo)

Writes <out>/gpu_check.json and <out>/gpu_check.md (rewritten after every section, so a run killed
half way still leaves a report), prints progress as it goes and ends with a one-line summary.
Exit code: 0 every section that ran passed, 1 a check failed (or a section errored / hit its cap /
was skipped for want of budget), 2 bad arguments. Performance goals are reported as targets (met /
missed); they never fail the run. One check can end as a warning instead of a failure: on a GPU, a
resumed loss trace that is not bit-identical while the two runs already differ BEFORE the signal (the
device's kernels are not deterministic, so bit-identity cannot be shown); both differences are reported.

CPU mode (`--cpu`, or no CUDA): the same code paths at tiny sizes, Triton's interpreter for the fused
kernel, gloo; labelled "CPU mode: correctness only, no performance numbers".
"""

# The docstring above is what `python tools/gpu_check.py --help` prints (cli.py).
#
# Layout: tools/gpu_check.py is the entry point; this package holds the rest, one job per module:
#   common.py       the run's plan (section titles, sizes and time caps per mode), Section (what a section
#                   records: checks, targets, numbers, tables, notes, skips; its deadline), Env, and the
#                   timing / memory helpers the sections share
#   reference.py    float64 rotation references and the rotation tolerances (sections b and c)
#   a_environment.py, b_rotary.py, c_context_parallel.py, d_attention.py, e_layer.py, f_train.py,
#   g_bench.py, h_planner.py, i_multi_gpu.py, j_preflight.py
#                   one section each: run(sec, env)
#   i_worker.py     section i's worker script (torchrun, 2 ranks): the layouts and the one-rank reference
#   report.py       the report: gpu_check.json, gpu_check.md, the closing summary
#   cli.py          the arguments; every section in turn under its time cap and the run's budget; exit code
