"""Worker: harpe-train's main() with one planted fault (launched by torchrun; see tests/test_faults.py).

Usage: fault_worker.py --out DIR [fault] -- <harpe-train args>
Faults (iterations are 1-based, the iteration being run or saved):
  --kill-at POINT:N   SIGKILL this process during the save of iteration N, at POINT:
                      before_shards (every rank, on entering megatron-core's save: staging dir made, nothing
                      written), between_shards (the last rank only, on entering the save: the others write their
                      shards and then lose it), before_latest (rank 0, after the rename, before `latest` is written)
  --nan-input-at N    the embedding output of iteration N is NaN (a NaN loss and NaN gradients, as overflow gives)
  --nan-grad-at N     one gradient of iteration N is NaN, the loss stays finite
  --nan-weight-at N   one weight is set to NaN right after iteration N's update (before its save)
Writes DIR/rank{RANK}.json: {exit_code, losses, iteration, reason}. A killed rank writes nothing.
"""
import argparse
import json
import os
import signal
import sys


def _die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--kill-at", default=None)
    parser.add_argument("--nan-input-at", type=int, action="append", default=[])
    parser.add_argument("--nan-grad-at", type=int, action="append", default=[])
    parser.add_argument("--nan-weight-at", type=int, default=None)
    args, rest = parser.parse_known_args()
    if rest and rest[0] == "--":
        rest = rest[1:]
    from megatron_harpe.backends import setup_backend

    setup_backend()
    import torch

    import megatron_harpe.training.checkpointing as ckpt_mod
    import megatron_harpe.training.trainer as trainer_mod
    from megatron_harpe import train
    from megatron_harpe.models import checkpoint as model_ckpt
    from megatron_harpe.models.unwrap import unwrap_model

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    state = {"iteration": 0}

    if args.kill_at:
        point, n = args.kill_at.split(":")
        name = f"iter_{int(n):07d}"
        if point in ("before_shards", "between_shards"):
            real_save = model_ckpt.dist_checkpointing.save

            class Saver:  # stands in for the module attribute models/checkpoint.py calls
                def __getattr__(self, attr):
                    return getattr(real_save_module, attr)

                @staticmethod
                def save(sharded, directory, *a, **kw):
                    if name in directory and (point == "before_shards" or rank == world - 1):
                        _die()
                    return real_save(sharded, directory, *a, **kw)

            real_save_module = model_ckpt.dist_checkpointing
            model_ckpt.dist_checkpointing = Saver()
        elif point == "before_latest":
            real_write = ckpt_mod.atomic_write_text

            def write(path, text):
                if os.path.basename(str(path)) == ckpt_mod.LATEST and text.strip() == name:
                    _die()
                return real_write(path, text)

            ckpt_mod.atomic_write_text = write
        else:
            raise SystemExit(f"unknown kill point {point}")

    real_step = trainer_mod.Trainer.train_step

    def step(self, stage, batches):
        state["iteration"] = self.iteration + 1
        hooks = []
        if state["iteration"] in args.nan_input_at:
            for chunk in self.chunks:
                model = unwrap_model(chunk)
                if getattr(model, "pre_process", False):
                    hooks.append(model.embedding.register_forward_hook(lambda m, i, out: out * float("nan")))
        try:
            out = real_step(self, stage, batches)
        finally:
            for h in hooks:
                h.remove()
        if state["iteration"] == args.nan_weight_at:
            with torch.no_grad():
                next(unwrap_model(self.chunks[0]).parameters()).view(-1)[0] = float("nan")
        return out

    trainer_mod.Trainer.train_step = step
    real_gradients_finite = trainer_mod.gradients_finite

    def gradients_finite(chunks, device):
        if state["iteration"] in args.nan_grad_at:
            chunk = chunks[0]
            buffers = getattr(chunk, "buffers", None)
            grad = buffers[0].grad_data if buffers else next(p.main_grad for p in chunk.parameters())
            grad.view(-1)[0] = float("nan")
        return real_gradients_finite(chunks, device)

    trainer_mod.gradients_finite = gradients_finite

    captured = {}
    real_run = trainer_mod.run

    def run_and_capture(cfg):
        captured["result"] = real_run(cfg)
        return captured["result"]

    trainer_mod.run = run_and_capture
    code = train.main(rest)
    result = captured.get("result")
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump({"exit_code": code, "losses": {str(k): v for k, v in (result.losses if result else {}).items()},
                   "iteration": result.iteration if result else None, "reason": result.reason if result else ""}, f)
    sys.exit(0)


if __name__ == "__main__":
    main()
