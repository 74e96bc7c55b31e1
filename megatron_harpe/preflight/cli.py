"""`harpe-preflight --config CONFIG [dotted.key=value ...]`: check a run before it spends cluster time.

Run it where the run will run, launched the way the run is launched (torchrun / srun / mpirun: the same
command harpe-train takes; slurm/train.sbatch runs it as the job's first step with PREFLIGHT=1). On a machine
without GPUs a single process starts its own gloo ranks, one per model-parallel rank of the layout.

It builds a reduced twin of the run (twin.py: same heads, K/V groups, head dim, position encoding, TP/CP/PP/DP,
packing, precision; 2 layers and a short sequence) and checks, each with its tolerance stated:

  environment              every rank's torch / megatron-core / TE / Triton / NCCL / GPU / driver, the same everywhere
  memory (full run)        harpe-plan's prediction for the real run fits the GPU (else: the planner's reason)
  layout parity            loss and gradients of the layout = a single-process fp32 reference, near and far positions
  rotary at far positions  every rank's angle for every head up to the run's last position = float64 from the bases
  accounting sanity        each rank computes its share of the sequence, attention has its CP group, MFU <= 100%
  memory (twin)            harpe-plan's prediction for the twin = what the twin allocates
  FP8 vs bf16              a few steps of the run's FP8 recipe against bf16 (GPU with Transformer Engine)
  initial model            step-0 loss from training.init_from = Hugging Face's on the same tokens
  export keeps positions   the config.json harpe-convert would write rotates as the run does

Output: the table on stdout, <run_dir>/preflight.md and preflight.json. Exit 0 when every check that applies
passed, 5 when one failed, 2 for bad input (megatron_harpe/cli.py).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

from megatron_harpe.cli import EXIT_CHECK_FAILED, InputError, run_command

PROG = "harpe-preflight"
CHILD_FLAG = "HARPE_PREFLIGHT_RANKS"  # set in the ranks a CPU preflight started itself
#: tokens of the initial-model check on a CPU (a GPU compares harpe-train --check-init's default)
CPU_INIT_TOKENS = 512


def parse_args(argv):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--config", required=True, help="the run's YAML config (as harpe-train takes it)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, as harpe-train takes them")
    parser.add_argument("--hf-dir", default=None,
                        help="the Hugging Face checkpoint training.init_from was converted from (default: the one "
                             "the conversion recorded)")
    parser.add_argument("--gpu", default=None, help="GPU the full run's memory is planned for (harpe-plan's names; "
                                                    "default: this machine's, else h100)")
    parser.add_argument("--gpus", type=int, default=None,
                        help="GPUs of the full run, for its memory plan (default: the launch's world size on GPUs; "
                             "one model replica, TP x PP x CP, on a CPU)")
    parser.add_argument("--gpu-memory-gib", type=float, default=None, help="usable memory per GPU, if not the "
                                                                           "named GPU's")
    parser.add_argument("--twin-seq-length", type=int, default=None,
                        help="the twin's sequence (default: the shortest >= 128 every CP chunk and TP shard needs)")
    parser.add_argument("--init-tokens", type=int, default=None,
                        help="tokens of the initial-model check (default: 16384 on GPUs, 512 on a CPU)")
    parser.add_argument("--keep-work", action="store_true", help="keep the twin's files (<run_dir>/preflight_work)")
    parser.add_argument("--verbose", action="store_true", help="show upstream warnings too (HARPE_VERBOSE=1)")
    parser.add_argument("--debug", action="store_true", help="tracebacks for bad-input errors too (HARPE_DEBUG=1)")
    return parser.parse_args(argv)


def _say(rank: int) -> Callable[[str], None]:
    def say(text: str) -> None:
        if rank == 0:
            print(f"{PROG}: {text}", flush=True)
    return say


def _self_launch(argv: List[str], nproc: int) -> int:
    """A CPU machine, one process, a layout of `nproc` ranks: start them (torchrun, gloo) and wait."""
    from megatron_harpe.parallel.launch import find_free_port

    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env[CHILD_FLAG] = str(nproc)
    print(f"{PROG}: starting {nproc} CPU ranks (gloo) for the layout", flush=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(find_free_port("127.0.0.1")), "-m", "megatron_harpe.preflight.cli",
           *argv]
    return subprocess.call(cmd, env=env)


def _preflight(args, argv: List[str]) -> int:
    from megatron_harpe.config.loader import load_config
    from megatron_harpe.config.validate import validate_config
    from megatron_harpe.parallel.launch import detect_launch

    cfg = load_config(args.config, args.overrides)
    launch = detect_launch()
    p = cfg.parallel
    model_parallel = p.tensor * p.pipeline * p.context
    if launch.world_size == 1 and model_parallel > 1 and not os.environ.get(CHILD_FLAG):
        import torch

        validate_config(cfg, model_parallel)  # a bad config answers here, not from every rank started for it
        if torch.cuda.is_available():
            raise InputError(f"the layout needs {model_parallel} ranks (TP {p.tensor} x PP {p.pipeline} x CP "
                             f"{p.context}) at least: launch {PROG} as the run is launched (torchrun "
                             f"--nproc-per-node ..., srun), or PREFLIGHT=1 in slurm/train.sbatch")
        return _self_launch(argv, model_parallel)
    validate_config(cfg, launch.world_size)
    if cfg.data.tokenizer_model is not None:
        from megatron_harpe.data.tokenizer import check_tokenizer_fits_model

        check_tokenizer_fits_model(cfg.data.tokenizer_type, cfg.data.tokenizer_model, cfg.model.vocab_size)

    from megatron_harpe.backends import setup_backend

    setup_backend()
    from megatron_harpe.training.runtime import check_runtime, detect_machine
    from megatron_harpe.preflight.twin import make_twin

    machine = detect_machine()
    run_dir = Path(cfg.run_dir)
    workdir = run_dir / "preflight_work"
    twin = make_twin(cfg, launch.world_size, cuda=machine.cuda, workdir=workdir, seq_length=args.twin_seq_length)
    check_runtime(twin.cfg, machine)
    import torch.distributed as dist

    from megatron_harpe.parallel.launch import init_distributed

    created = not dist.is_initialized()  # a caller's group (several preflights in one launch) is left to it
    launch = init_distributed(info=launch)
    try:
        return _checks(args, cfg, twin, machine, launch, workdir)
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def _checks(args, cfg, twin, machine, launch, workdir: Path) -> int:
    import torch.distributed as dist

    from megatron_harpe.preflight.accounting import accounting_check, attention_cp_groups
    from megatron_harpe.preflight.environment_check import environment_check
    from megatron_harpe.preflight.fp8_check import fp8_check
    from megatron_harpe.preflight.init_model import export_check, initial_model_check
    from megatron_harpe.preflight.layout_run import gather_objects, run_layout, samples_from_windows, twin_windows
    from megatron_harpe.preflight.memory_check import full_run_memory, twin_memory
    from megatron_harpe.preflight.parity import layout_parity
    from megatron_harpe.preflight.report import table, verdict, write_reports
    from megatron_harpe.preflight.rotary_check import rotary_check

    rank = launch.rank
    say = _say(rank)
    started = time.perf_counter()
    say(f"{launch.launcher} launch, world size {launch.world_size}; twin: {twin.describe()}")
    for note in twin.notes:
        say(f"twin: {note}")
    if rank == 0:
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    results = []

    def record(result):
        results.append(result)
        say(f"{result.name}: {result.status.upper()} ({result.seconds:.1f} s)")
        return result

    record(environment_check())
    gpus = args.gpus or (launch.world_size if machine.cuda else None)
    full_memory = record(full_run_memory(cfg, args.gpu or _gpu_name(machine), args.gpu_memory_gib, gpus=gpus,
                                         config_path=args.config))
    windows = twin_windows(twin)
    probes = {"rotary": lambda t, trainer: rotary_check(t.model_cfg, t.target_length, trainer.chunks),
              "attention_cp_groups": lambda t, trainer: gather_objects(attention_cp_groups(t, trainer))}
    layout_started = time.perf_counter()
    run = run_layout(twin, workdir, probes, log=say)
    parity = layout_parity(twin, run, windows, workdir)
    parity.seconds = time.perf_counter() - layout_started - run.probes["rotary"].seconds
    record(parity)
    record(run.probes["rotary"])
    peak = cfg.logging.peak_tflops_per_device or machine.peak_tflops(fp8=cfg.fp8.format is not None)
    record(accounting_check(twin, run, windows, peak, predicted=full_memory.details.get("predicted")))
    record(_twin_memory_here(twin, machine, twin_memory))

    def batches():
        from megatron.core import parallel_state as ps

        from megatron_harpe.training.data import MicroBatches

        return MicroBatches(samples_from_windows(windows, twin.cfg.data.eod_mask_loss),
                            global_batch=twin.cfg.data.global_batch_size, micro_batch=twin.cfg.data.micro_batch_size,
                            dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size()
                            ).iteration(0)

    record(fp8_check(twin, machine, run.weights, batches))
    tokens = args.init_tokens or (16384 if machine.cuda else CPU_INIT_TOKENS)
    record(initial_model_check(cfg, args.hf_dir, tokens, log=say))
    record(export_check(twin.full_model_cfg))

    if rank == 0:
        header = {"config": args.config, "overrides": " ".join(args.overrides) or "-",
                  "launch": f"{launch.launcher}, world size {launch.world_size}", "twin": twin.describe(),
                  "twin notes": "; ".join(twin.notes) or "-", "target length": twin.target_length,
                  "seconds": round(time.perf_counter() - started, 1)}
        paths = write_reports(Path(cfg.run_dir), results, header)
        print(table(results), flush=True)
        print(f"{PROG}: {verdict(results)} in {time.perf_counter() - started:.0f} s | {paths[0]} | {paths[1]}",
              flush=True)
        if not args.keep_work:
            shutil.rmtree(workdir, ignore_errors=True)
    dist.barrier()  # every rank leaves with the report written
    return EXIT_CHECK_FAILED if any(r.failed for r in results) else 0


def _twin_memory_here(twin, machine, twin_memory):
    """The twin's memory check, unless a CPU cannot hold what it builds: every rank's model state and Adam moments
    at once (the layout's own passes hold no optimizer state; 32 ranks of a 7B twin need more RAM than a laptop).
    Then it says so, with the numbers, and the planner's accuracy stays what tests/test_preflight_memory.py and
    docs/planning.md show."""
    from megatron_harpe.preflight.result import NOT_RUN, CheckResult

    if machine.cuda:
        return twin_memory(twin.cfg, twin.world_size)
    import psutil

    m, p = twin.model_cfg, twin.cfg.parallel
    attention = m.hidden_size * (m.num_attention_heads + 2 * m.groups) * m.head_dim + \
        m.num_attention_heads * m.head_dim * m.hidden_size
    params = m.num_layers * (attention + 3 * m.hidden_size * m.ffn_hidden_size) + 2 * m.vocab_size * m.hidden_size
    per_rank = params / (p.tensor * p.pipeline) * 4 * 5  # fp32 weights, gradients, two moments, a step's working set
    need = per_rank * twin.world_size + twin.world_size * (256 << 20)
    from megatron_harpe.preflight.parity import share

    available = share(psutil.virtual_memory().available)  # rank 0's view decides for all: one collective path
    if need > available:
        return CheckResult("memory (twin)", NOT_RUN,
                           f"measuring the twin on {twin.world_size} CPU ranks needs about {need / 2**30:.1f} GiB "
                           f"of RAM, {available / 2**30:.1f} GiB is available here: run it on the job's GPUs")
    return twin_memory(twin.cfg, twin.world_size)


def _gpu_name(machine) -> Optional[str]:
    if not machine.cuda:
        return None
    import torch

    name = torch.cuda.get_device_name().lower()
    for known in ("h200", "h100", "a100", "b200", "gh200"):
        if known in name:
            return known
    return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    return run_command(PROG, lambda: _preflight(args, argv), argv=argv, interrupted="nothing of the run was written")


if __name__ == "__main__":
    sys.exit(main())
