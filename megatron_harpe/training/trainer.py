"""The training loop on megatron-core, top to bottom.

    run(cfg)
      -> parallel state (TP/PP/CP/DP), seeds
      -> stage schedule; resume point (latest checkpoint) or init_from (a checkpoint written on another
         software stack is said in one line: environment.py)
      -> model chunks (provider) wrapped in megatron-core DDP; megatron-core optimizer + scheduler
      -> per iteration: this DP rank's micro-batches -> forward_backward_func (PP/VPP schedules)
         -> optimizer.step -> scheduler.step -> loss reduced over DP/CP, shared by all ranks
         (batches checked against the vocabulary first; a non-finite loss or gradient is never applied:
         the run stops or skips the batch, training/nonfinite.py)
         -> log; checkpoint on interval / stage end / signal / finish
      -> stage boundary: checkpoint, switch position base(s) and sequence length, new data

Losses are summed per token and normalised by the global token count (megatron-core's
calculate_per_token_loss): the result does not depend on how tokens are split over
micro-batches, DP ranks or CP ranks.
"""
from __future__ import annotations

import contextlib
import copy
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megatron_harpe import compat
from megatron_harpe.cli import InputError
from megatron_harpe.config.loader import dump_config, to_dict
from megatron_harpe.config.schema import Config
from megatron_harpe.config.stages import Stage, build_schedule, stage_at
from megatron_harpe.config.validate import parse_signals
from megatron_harpe.environment import ENVIRONMENT_KEY, environment_changes, environment_record, environment_warning
from megatron_harpe.files import atomic_write_text
from megatron_harpe.models.checkpoint import read_common_state
from megatron_harpe.models.provider import build_model, replace_position_encoding
from megatron_harpe.models.transformer_config import (build_transformer_config, fp8_settings, fusion_settings,
                                                      rope_kernel)
from megatron_harpe.models.unwrap import unwrap_model
from megatron_harpe.profile_ranges import profile_range
from megatron_harpe.training import checkpointing as ckpt
from megatron_harpe.training.data import MicroBatches, build_datasets, iterators_for_chunks
from megatron_harpe.training.evaluation import reduce_sums, validation_loss
from megatron_harpe.training.probes import build_probe_prompts, score_probes
from megatron_harpe.training.metrics import MetricsLogger, model_flops_per_token, summary_line
from megatron_harpe.training.packing import pack_micro_batch, packed_seq_params, stream_multiple
from megatron_harpe.training.profiling import IterationProfiler
from megatron_harpe.training.runtime import detect_machine
from megatron_harpe.training.nonfinite import NonfinitePolicy, NonfiniteWeights, gradients_finite, weights_finite
from megatron_harpe.training.signals import EXIT_CODE_NONFINITE_LOSS, EXIT_CODE_REQUEUE, SignalWatcher
from megatron_harpe.training.token_ids import check_token_ids, sample_source


@dataclass
class RunResult:
    exit_code: int
    iteration: int
    losses: Dict[int, float] = field(default_factory=dict)
    reason: str = ""


def _params_dtype(cfg: Config) -> torch.dtype:
    precision = cfg.training.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = Path(cfg.checkpoint.dir or self.run_dir / "checkpoints")
        self.stages: List[Stage] = build_schedule(cfg)
        self.total_iterations = self.stages[-1].end_iteration
        self.device = _device()
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.machine = detect_machine()
        if self.rank == 0:
            compat.warn_if_unverified()
        p = cfg.parallel
        ps.initialize_model_parallel(tensor_model_parallel_size=p.tensor, pipeline_model_parallel_size=p.pipeline,
                                     virtual_pipeline_model_parallel_size=p.virtual_pipeline,
                                     context_parallel_size=p.context,
                                     hierarchical_context_parallel_sizes=_hierarchical_context(p))
        _seed_everything(cfg.training.seed)
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_size = ps.get_data_parallel_world_size()
        self.params_dtype = _params_dtype(cfg)
        self.replan = False
        self._log_event = None
        self.iteration = 0
        self.tidy_notes: List[str] = []
        self.environment_notes: List[str] = []  # checkpoints read that another software stack wrote (run() logs)
        self.resumed_from: Optional[Path] = None
        self._first_batches = None  # (iteration, batches) read and checked in _prepare
        self.nonfinite = NonfinitePolicy(cfg.training.on_nonfinite, cfg.training.max_skipped_iterations)

    # ------------------------------------------------------------------ building
    def _transformer_config(self, model_cfg):
        p, t, m = self.cfg.parallel, self.cfg.training, self.machine
        self.rope_kernel = rope_kernel(model_cfg, cuda=m.cuda, te=m.te, triton=m.triton,
                                       interpreted=m.triton_interpreted)
        return build_transformer_config(
            model_cfg, tensor_parallel=p.tensor, pipeline_parallel=p.pipeline,
            virtual_pipeline_parallel=p.virtual_pipeline, context_parallel=p.context,
            sequence_parallel=p.sequence_parallel, params_dtype=self.params_dtype,
            use_cpu_initialization=not m.cuda,
            fusions=fusion_settings(model_cfg, cuda=m.cuda, te=m.te, kernel=self.rope_kernel,
                                    apex_wgrad=m.apex_wgrad),
            calculate_per_token_loss=True,
            recompute_granularity=t.recompute_granularity, recompute_method=t.recompute_method,
            recompute_num_layers=t.recompute_num_layers, recompute_modules=t.recompute_modules,
            cp_comm_type=p.cp_comm_type if p.context > 1 else None,
            hierarchical_context_parallel_sizes=_hierarchical_context(p),
            batch_p2p_comm=compat.batch_p2p_comm(p.virtual_pipeline),
            **fp8_settings(self.cfg.fp8),
        )

    def schedule_plan(self) -> Dict[str, Any]:
        """The learning-rate schedule this config asks for, as stored with every checkpoint."""
        s, o = self.cfg.scheduler, self.cfg.optimizer
        decay = s.decay_iterations or max(self.total_iterations - s.warmup_iterations, 1)
        return {"total_iterations": self.total_iterations, "warmup_iterations": s.warmup_iterations,
                "decay_end_iteration": s.warmup_iterations + decay, "decay_style": s.decay_style,
                "lr": o.lr, "min_lr": o.min_lr}

    def _check_schedule(self, saved: Optional[Dict[str, Any]], iteration: int, where) -> None:
        """A resumed run with another schedule (more iterations, another lr...) is re-planned only when
        asked (scheduler.replan_on_resume), and then says so; otherwise it is refused. Silently keeping
        the checkpoint's schedule would run the added iterations at min_lr."""
        self.replan = False
        plan = self.schedule_plan()
        if saved is None or saved == plan:
            return
        changed = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in plan.items() if saved.get(k) != v)
        if not self.cfg.scheduler.replan_on_resume:
            raise InputError(f"{where} was saved at iteration {iteration} of another schedule ({changed}). Restore "
                             f"the old settings to continue it, or set scheduler.replan_on_resume=true to continue "
                             f"on the new schedule from iteration {iteration} (the learning rate follows the new "
                             f"plan from there on)")
        self.replan = True
        self.replan_note = f"learning-rate schedule re-planned at iteration {iteration}: {changed}"

    def _build(self, model_cfg) -> None:
        p = self.cfg.parallel
        self.tcfg = self._transformer_config(model_cfg)
        num_chunks = p.virtual_pipeline or 1
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=p.overlap_grad_reduce,
            overlap_param_gather=p.overlap_param_gather, use_distributed_optimizer=p.distributed_optimizer)
        self.chunks = []
        for vp in range(num_chunks):
            vp_stage = vp if p.virtual_pipeline else None
            model = build_model(model_cfg, self.tcfg,
                                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                                vp_stage=vp_stage, rope_kernel=self.rope_kernel)
            if torch.cuda.is_available():
                model.cuda(torch.cuda.current_device())
            self.chunks.append(DistributedDataParallel(self.tcfg, ddp_config, model, disable_bucketing=vp > 0))
        o = self.cfg.optimizer
        self.optimizer = get_megatron_optimizer(
            MegatronOptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                                    adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
                                    clip_grad=o.clip_grad, bf16=self.params_dtype == torch.bfloat16,
                                    params_dtype=self.params_dtype,
                                    use_distributed_optimizer=p.distributed_optimizer),
            self.chunks)
        if p.distributed_optimizer:  # an optimizer format this optimizer cannot resume from: refused now, not at a save
            ckpt.optimizer_format_metadata(self.optimizer, self.cfg.checkpoint.optimizer_format)
        plan = self.schedule_plan()
        # replan: the config's schedule wins over the checkpoint's (megatron-core's override flag)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=plan["lr"], min_lr=plan["min_lr"],
            lr_warmup_steps=plan["warmup_iterations"], lr_decay_steps=plan["decay_end_iteration"],
            lr_decay_style=plan["decay_style"], start_wd=o.weight_decay, end_wd=o.weight_decay,
            wd_incr_steps=max(self.total_iterations, 1), wd_incr_style="constant",
            use_checkpoint_opt_param_scheduler=not self.replan, override_opt_param_scheduler=self.replan)
        self.tcfg.finalize_model_grads_func = finalize_model_grads
        self.tcfg.grad_scale_func = self.optimizer.scale_loss
        # data.document_mask: a packed micro-batch's length varies with its documents' CP padding, so
        # pipeline stages exchange each activation's shape before it (megatron-core's p2p option)
        self.tcfg.variable_seq_lengths = self.cfg.data.document_mask and p.pipeline > 1
        if p.overlap_grad_reduce:
            no_sync = [c.no_sync for c in self.chunks]
            self.tcfg.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
            grad_sync = [c.start_grad_sync for c in self.chunks]
            self.tcfg.grad_sync_func = grad_sync[0] if len(grad_sync) == 1 else grad_sync
        if p.overlap_param_gather and p.distributed_optimizer:
            param_sync = [c.start_param_sync for c in self.chunks]
            self.tcfg.param_sync_func = param_sync[0] if len(param_sync) == 1 else param_sync

    def _data_for(self, stage: Stage) -> MicroBatches:
        """The stage's training batches; its validation batches (the same ones at every evaluation of
        the stage) go to self.valid_batches."""
        d, t = self.cfg.data, self.cfg.training
        cache = d.cache_dir or str(self.run_dir / "data_cache")
        eod = self.eod_id = _tokenizer_eod(d)
        valid_samples = t.eval_iterations * d.global_batch_size if t.eval_interval else 0
        train, valid = build_datasets(d, vocab_size=self.cfg.model.vocab_size, seq_length=stage.seq_length,
                                      num_samples=stage.iterations * d.global_batch_size, valid_samples=valid_samples,
                                      seed=t.seed + stage.index, eod_id=eod, cache_dir=cache)
        batches = dict(global_batch=d.global_batch_size, micro_batch=d.micro_batch_size, dp_rank=self.dp_rank,
                       dp_size=self.dp_size)
        self.valid_batches = [] if valid is None else [
            batch for i in range(t.eval_iterations) for batch in MicroBatches(valid, **batches).iteration(i)]
        per_iteration = len(self.valid_batches) // max(t.eval_iterations, 1)
        check_token_ids(self.valid_batches, stage.model_cfg.vocab_size, device=self.device,
                        what=f"stage {stage.index}'s validation batches",
                        locate=lambda j, row: sample_source(valid, MicroBatches(valid, **batches).sample_index(
                            j // per_iteration, j % per_iteration, row)))
        return MicroBatches(train, **batches)

    # ------------------------------------------------------------------ one step
    def _forward_step(self, data_iterator, model):
        if self.cfg.data.document_mask:
            return self._forward_step_packed(next(data_iterator), model)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in next(data_iterator).items()}
        if self.cfg.parallel.context > 1:
            batch = compat.batch_on_this_cp_rank(batch)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(_loss_func, batch["loss_mask"])

    def _forward_step_packed(self, batch, model):
        """data.document_mask: the micro-batch as one packed (THD) sequence whose documents end at EOD
        tokens, so attention and RoPE/HARPE positions restart per document (training/packing.py). The
        layout is computed on the host from the CPU batch; this CP rank's rows (chunks r and 2cp-1-r of
        every document) are all that moves to the device. Padding rows have loss_mask 0."""
        p = self.cfg.parallel
        multiple = stream_multiple(p.context, p.tensor, p.sequence_parallel, fp8=self.cfg.fp8.format is not None)
        packed, layout = pack_micro_batch(batch, self.eod_id, cp_size=p.context,
                                          cp_rank=ps.get_context_parallel_rank(), total_multiple=multiple)
        packed = {k: v.to(self.device, non_blocking=True) for k, v in packed.items()}
        output = model(packed["tokens"], packed["position_ids"], None, labels=packed["labels"],
                       packed_seq_params=packed_seq_params(layout, self.device))
        return output, partial(_loss_func, packed["loss_mask"])

    def train_step(self, stage: Stage, batches) -> tuple[float, Optional[float], Optional[str]]:
        """(loss, grad norm, None) for an applied update; (loss, None, what went wrong) when the loss or the
        gradients are not finite, and then nothing is applied (training/nonfinite.py)."""
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        with profile_range("harpe/forward_backward"):
            outputs = get_forward_backward_func()(
                forward_step_func=self._forward_step, data_iterator=iterators_for_chunks(batches, len(self.chunks)),
                model=self.chunks, num_microbatches=len(batches), seq_length=stage.seq_length,  # divided by CP there
                micro_batch_size=self.cfg.data.micro_batch_size, forward_only=False)
        loss = self._reduce_loss(outputs)
        verdict = self.nonfinite.verdict(self.iteration + 1, loss, gradients_finite(self.chunks, self.device))
        if verdict is not None:
            return loss, None, verdict
        with profile_range("harpe/optimizer_step"):
            _, grad_norm, _ = self.optimizer.step()
            self.scheduler.step(increment=1)
        return loss, grad_norm, None

    def _reduce_loss(self, outputs) -> float:
        """Token-weighted mean loss of the iteration, identical on every rank."""
        totals = reduce_sums([out["lm loss"] for out in outputs], 2, self.device)
        return (totals[0] / totals[1]).item()

    # ------------------------------------------------------------------ the run
    def run(self) -> RunResult:
        iteration, data = self._prepare()
        self.config_yaml = dump_config(self.cfg)
        if self.rank == 0:
            atomic_write_text(self.run_dir / "config.yaml", self.config_yaml)
        logger = self._metrics_logger(start_iteration=iteration)
        p = self.cfg.parallel
        logger.log_event(f"{self.how}; {len(self.stages)} stage(s), {self.total_iterations} iterations, "
                         f"world {self.world} = TP {p.tensor} x PP {p.pipeline} x CP {p.context} x DP {self.dp_size}")
        for note in self.tidy_notes:
            logger.log_event(f"checkpoints: {note}")
        for note in self.environment_notes:
            logger.log_event(f"warning: {note}")
        if self.resumed_from is not None and self.rank == self.world - 1:  # a disk too full for the next save: said now
            warning = ckpt.space_warning(self.ckpt_dir, self.resumed_from)
            if warning:
                logger.log_event(warning)
        compat.start_checkpoint_writer_shielded(parse_signals(self.cfg.checkpoint.exit_signals))
        self._log_event = logger.log_event
        self.result = RunResult(exit_code=0, iteration=iteration)
        with SignalWatcher(self.cfg.checkpoint.exit_signals) as watcher:
            try:
                result = self._train(iteration, data, logger, watcher)
            except NonfiniteWeights as err:
                result = self.result
                result.exit_code, result.reason = EXIT_CODE_NONFINITE_LOSS, str(err)
        logger.log_event(f"{result.reason} | {summary_line(logger.summary())} | checkpoints: {self.ckpt_dir} | "
                         f"TensorBoard: {self.run_dir / 'tensorboard'} | metrics: {self.run_dir / 'metrics.jsonl'}")
        logger.close()
        return result

    def _prepare(self) -> tuple[int, MicroBatches]:
        """Model, optimizer, checkpoint and data: everything that can fail on bad input, before anything
        of the run is written. A run directory that this failure would leave behind half made (the data
        cache is written into it) is removed again."""
        existed = self.run_dir.exists()
        try:
            iteration, self.how = self._resume_or_start()
            self.probes = self._probe_prompts()
            stage = stage_at(self.stages, iteration)
            data = self._data_for(stage)
            if iteration < self.total_iterations:  # data of another vocabulary: refused before anything is written
                self._first_batches = (iteration, self._checked_batches(data, stage, iteration))
            return iteration, data
        except InputError:
            if not existed and self.rank == 0:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise

    def _resume_or_start(self) -> tuple[int, str]:
        """Build the model for where the run stands: (first iteration to run, how we got there)."""
        if self.cfg.checkpoint.resume:  # what an interrupted save left behind, cleared and said (logged in run())
            notes = [ckpt.tidy_checkpoint_dir(self.ckpt_dir) if self.rank == 0 else None]
            dist.broadcast_object_list(notes, src=0)  # the logging rank is the last one
            self.tidy_notes = notes[0]
        latest = ckpt.latest_checkpoint(self.ckpt_dir) if self.cfg.checkpoint.resume else None
        if latest is None:
            self._build(self.stages[0].model_cfg)
            if self.cfg.training.init_from:
                source = ckpt.resolve_checkpoint_path(self.cfg.training.init_from)
                common = ckpt.load_weights_only(source, self.chunks)
                self._note_environment(common, f"training.init_from checkpoint {source}",
                                       "numerics may differ from those of the run that wrote it")
                return 0, f"weights from {source}"
            return 0, "fresh start"
        self.resumed_from = latest
        common = read_common_state(latest)
        self._note_environment(common, f"checkpoint {latest}", "numerics may differ from the run so far")
        iteration = int(common["iteration"])
        self.nonfinite.skipped = list(common.get("skipped_iterations", []))
        self._check_schedule(common.get("schedule"), iteration, f"checkpoint {latest}")
        saved_stage = stage_at(self.stages, max(iteration - 1, 0))
        self._build(saved_stage.model_cfg)
        info = ckpt.load_checkpoint(latest, chunks=self.chunks, optimizer=self.optimizer, scheduler=self.scheduler,
                                    model_cfg=saved_stage.model_cfg)
        current = stage_at(self.stages, iteration)
        if current.index != saved_stage.index:
            self._switch_stage(current)
        how = f"resumed from {latest} at iteration {iteration}"
        if not info["rng_restored"]:
            how += " (parallel layout changed: RNG streams re-seeded, weights/optimizer resharded)"
        if self.replan:
            how += f"; {self.replan_note}"
        return iteration, how

    def _note_environment(self, common: Dict[str, Any], what: str, consequence: str) -> None:
        """Collective. Keep a note (logged in run()) when the checkpoint's software stack is not this one:
        rank 0's record against rank 0's (the one a checkpoint holds; other ranks may sit on other hosts)."""
        changes = [environment_changes(common.get(ENVIRONMENT_KEY), environment_record()) if self.rank == 0
                   else None]
        dist.broadcast_object_list(changes, src=0)  # the logging rank is the last one
        if changes[0]:
            self.environment_notes.append(environment_warning(what, changes[0], consequence))

    def _peak_tflops(self) -> Optional[float]:
        configured = self.cfg.logging.peak_tflops_per_device
        return configured if configured is not None else self.machine.peak_tflops(fp8=self.cfg.fp8.format is not None)

    def _metrics_logger(self, start_iteration: int) -> MetricsLogger:
        log = self.cfg.logging
        return MetricsLogger(str(self.run_dir), is_logging_rank=self.rank == self.world - 1,
                             total_iterations=self.total_iterations, tensorboard=log.tensorboard,
                             progress_bar=log.progress_bar, interval=log.interval,
                             peak_tflops_per_device=self._peak_tflops(), start_iteration=start_iteration,
                             wandb=log.wandb, run_config=to_dict(self.cfg))  # W&B: on the logging rank, if on

    def _train(self, iteration: int, data: MicroBatches, logger: MetricsLogger,
               watcher: SignalWatcher) -> RunResult:
        """Iterations until the end, a non-finite loss or a signal; checkpoints as configured."""
        cfg = self.cfg
        result = self.result
        stage = stage_at(self.stages, iteration)
        profiler = IterationProfiler(cfg.logging.profile, run_dir=self.run_dir, rank=self.rank,
                                     first_iteration=iteration, log_event=logger.log_event)
        while iteration < self.total_iterations:
            if iteration >= stage.end_iteration:  # stage boundary
                self._save(iteration, stage)
                stage = stage_at(self.stages, iteration)
                self._switch_stage(stage)
                data = self._data_for(stage)
                logger.log_event(f"stage {stage.index} ({stage.name}) begins at iteration {iteration}: "
                                 f"seq_length {stage.seq_length}, {stage.model_cfg.position.describe()}")
            started = time.perf_counter()
            first, self._first_batches = self._first_batches, None  # (checked in _prepare: not read twice)
            batches = first[1] if first and first[0] == iteration else self._checked_batches(data, stage, iteration)
            self.iteration = iteration
            with profiler.iteration(iteration):  # logging.profile: a trace of its iterations
                loss, grad_norm, verdict = self.train_step(stage, batches)
            iteration += 1
            result.iteration, result.losses[iteration] = iteration, loss
            tokens = cfg.data.global_batch_size * stage.seq_length
            logger.log_iteration(iteration, loss=loss, lr=self.scheduler.get_lr(self.optimizer.param_groups[0]),
                                 grad_norm=grad_norm, tokens=tokens, elapsed_s=time.perf_counter() - started,
                                 flops=tokens * _flops_per_token(stage), world_size=self.world,
                                 extra={"stage": stage.index, "skipped": int(verdict is not None)})
            if verdict is not None:
                if not self.nonfinite.may_skip():
                    result.exit_code, result.reason = EXIT_CODE_NONFINITE_LOSS, self._nonfinite_stop(verdict)
                    profiler.close()
                    return result
                self.nonfinite.skipped.append(iteration)
                first = (iteration - 1 - stage.start_iteration) * cfg.data.global_batch_size
                logger.log_event(f"{verdict}: update skipped ({len(self.nonfinite.skipped)} of at most "
                                 f"{self.nonfinite.max_skipped} over the run, training.max_skipped_iterations); the "
                                 f"batch was samples [{first}, {first + cfg.data.global_batch_size}) of stage "
                                 f"{stage.index}'s training data")
            if watcher.should_stop(self.device):
                self._save(iteration, stage)
                received = ",".join(dict.fromkeys(watcher.received)) or "on another rank"
                result.exit_code, result.reason = EXIT_CODE_REQUEUE, (
                    f"signal {received}: checkpoint saved at iteration {iteration}; exit code {EXIT_CODE_REQUEUE} "
                    f"asks the scheduler to requeue")
                profiler.close()
                return result
            self._evaluate_if_due(iteration, stage, logger)
            if cfg.checkpoint.save_interval and iteration % cfg.checkpoint.save_interval == 0:
                self._save(iteration, stage)
        self._save(iteration, stage)
        result.reason = f"finished {iteration} iterations"
        return result

    # ------------------------------------------------------------------ evaluation
    def _probe_prompts(self):
        probe = self.cfg.training.probe
        if not probe.lengths:
            return []
        from megatron_harpe.data.tokenizer import load_tokenizer

        d = self.cfg.data
        tokenizer = load_tokenizer(d.tokenizer_type, d.tokenizer_model)
        if tokenizer.vocab_size > self.cfg.model.vocab_size:
            raise InputError(f"training.probe: data.tokenizer_model has {tokenizer.vocab_size} tokens but "
                             f"model.vocab_size is {self.cfg.model.vocab_size}; the probe prompts would not fit the "
                             f"embedding")
        try:
            return build_probe_prompts(tokenizer, probe.lengths, probe.prompts, probe.seed)
        except ValueError as err:
            raise InputError(str(err)) from None

    def _evaluate_if_due(self, iteration: int, stage: Stage, logger: MetricsLogger) -> None:
        """Validation loss every training.eval_interval iterations and probes every probe.interval, both
        at the last iteration too. Skipped after a signal (the run is about to stop; its grace time is
        for the checkpoint)."""
        t, p = self.cfg.training, self.cfg.parallel
        last = iteration == self.total_iterations

        def due(interval):
            return bool(interval) and (iteration % interval == 0 or last)

        run_eval, run_probes = due(t.eval_interval), bool(self.probes) and due(t.probe.interval or t.eval_interval)
        if not (run_eval or run_probes):
            return
        with self._parameters_gathered():
            if run_eval:
                logger.log_evaluation(iteration, validation_loss(
                    self.chunks, self._forward_step, self.valid_batches, seq_length=stage.seq_length,
                    micro_batch_size=self.cfg.data.micro_batch_size, device=self.device))
            if run_probes:
                logger.log_evaluation(iteration, score_probes(
                    self.chunks, self.probes, dp_rank=self.dp_rank, dp_size=self.dp_size, context_parallel=p.context,
                    virtual_pipeline=p.virtual_pipeline is not None, device=self.device), kind="probe")

    @contextlib.contextmanager
    def _parameters_gathered(self):
        """With the distributed optimizer and overlap_param_gather, the all-gather of the parameters the
        last step updated is deferred to the next forward (hooks): a rank's copy of the shards it does
        not own is one step stale until then. Gather them before saving, as megatron-core's own
        trainer does, and put the hooks back afterwards."""
        p = self.cfg.parallel
        if not (p.distributed_optimizer and p.overlap_param_gather):
            yield
            return
        for chunk in self.chunks:
            chunk.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            for chunk in self.chunks:
                chunk.enable_forward_pre_hook()

    def _nonfinite_stop(self, verdict: str) -> str:
        t = self.cfg.training
        why = ("training.on_nonfinite=stop" if t.on_nonfinite == "stop" else
               f"{len(self.nonfinite.skipped)} update(s) already skipped, training.max_skipped_iterations="
               f"{t.max_skipped_iterations}")
        return (f"{verdict}: stopping ({why}); the update was not applied and the last good checkpoint "
                f"({ckpt.latest_checkpoint(self.ckpt_dir)}) is kept. Lower the learning rate or check the data, "
                f"then resume (training.on_nonfinite=skip skips such batches)")

    def _checked_batches(self, data: MicroBatches, stage: Stage, iteration: int):
        """This rank's micro-batches of `iteration`, after the collective token-id check (token_ids.py)."""
        in_stage = iteration - stage.start_iteration
        batches = data.iteration(in_stage)
        check_token_ids(batches, stage.model_cfg.vocab_size, device=self.device,
                        what=f"the batch of iteration {iteration + 1}",
                        locate=lambda j, row: sample_source(data.dataset, data.sample_index(in_stage, j, row)))
        return batches

    def _save(self, iteration: int, stage: Stage) -> None:
        if ckpt.latest_checkpoint(self.ckpt_dir) == self.ckpt_dir / ckpt.checkpoint_name(iteration):
            return
        if not weights_finite(self.chunks, self.device):  # never a checkpoint that cannot resume
            raise NonfiniteWeights(f"the weights are not finite at iteration {iteration}: checkpoint "
                                   f"{ckpt.checkpoint_name(iteration)} not written; the last good one "
                                   f"({ckpt.latest_checkpoint(self.ckpt_dir)}) is kept")
        started = time.perf_counter()
        with self._parameters_gathered():
            self._write_checkpoint(iteration, stage)
        if self._log_event is not None:  # how long a save blocks training: what would justify async saving
            self._log_event(f"checkpoint {ckpt.checkpoint_name(iteration)} saved in "
                            f"{time.perf_counter() - started:.2f} s")
            warning = ckpt.space_warning(self.ckpt_dir, self.ckpt_dir / ckpt.checkpoint_name(iteration)) \
                if self.rank == self.world - 1 else None  # (the logging rank)
            if warning:
                self._log_event(warning)

    def _write_checkpoint(self, iteration: int, stage: Stage) -> None:
        ckpt.save_checkpoint(self.ckpt_dir, iteration, chunks=self.chunks, optimizer=self.optimizer,
                             scheduler=self.scheduler, model_cfg=stage.model_cfg,
                             common={"iteration": iteration, "stage": stage.index,
                                     "schedule": self.schedule_plan(),
                                     "skipped_iterations": list(self.nonfinite.skipped)},
                             keep_last=self.cfg.checkpoint.keep_last, config_yaml=self.config_yaml,
                             optimizer_format=self.cfg.checkpoint.optimizer_format)

    def _switch_stage(self, stage: Stage) -> None:
        for chunk in self.chunks:
            replace_position_encoding(unwrap_model(chunk), stage.model_cfg)


def _hierarchical_context(p) -> Optional[List[int]]:
    """The a2a+p2p levels for megatron-core (config/schema.py ParallelConfig says why they must be passed)."""
    if p.cp_comm_type == "a2a+p2p" and p.context > 1:
        return list(p.hierarchical_context_sizes)
    return None


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.reshape(-1).float()
    loss_sum = (losses * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach().double(), num_tokens.double()])
    return loss_sum, num_tokens, {"lm loss": report}


def _tokenizer_eod(data) -> Optional[int]:
    if data.tokenizer_model is None:
        return None
    from megatron_harpe.data.tokenizer import load_tokenizer

    return load_tokenizer(data.tokenizer_type, data.tokenizer_model, eod_token=data.eod_token).eod_id


def _flops_per_token(stage: Stage) -> float:
    m = stage.model_cfg
    return model_flops_per_token(m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads, m.groups,
                                 m.vocab_size, stage.seq_length)


def run(cfg: Config) -> RunResult:
    """Train with an initialised default process group (see megatron_harpe.train for the CLI)."""
    trainer = Trainer(copy.deepcopy(cfg))
    try:
        return trainer.run()
    finally:
        ps.destroy_model_parallel()
