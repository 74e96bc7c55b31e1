"""Worker: run harpe-train's main() in this process (launched by torchrun, mpirun or by hand).

Usage: train_worker.py --out DIR [--send-signal-at N] -- <harpe-train args>
Writes DIR/rank{RANK}.json with the exit code and the per-iteration losses. With
--send-signal-at N, rank 0 sends itself SIGTERM after iteration N (a scheduler's warning),
exercising the agree-checkpoint-exit path.
"""
import argparse
import json
import os
import signal
import sys


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--send-signal-at", type=int, default=None)
    parser.add_argument("--signal-children", action="store_true",
                        help="also signal rank 0's child processes, as Slurm signals every process of a step")
    args, rest = parser.parse_known_args()
    if rest and rest[0] == "--":
        rest = rest[1:]
    from megatron_harpe.backends import setup_backend

    setup_backend()
    import megatron_harpe.training.trainer as trainer_mod
    from megatron_harpe import train

    captured = {}
    original_run = trainer_mod.run

    def run_and_capture(cfg):
        if args.send_signal_at is not None:
            original_step = trainer_mod.Trainer.train_step
            state = {"n": 0}

            def step(self, stage, batches):
                out = original_step(self, stage, batches)
                state["n"] += 1
                if state["n"] == args.send_signal_at and int(os.environ.get("RANK", "0")) == 0:
                    if args.signal_children:
                        import psutil

                        for child in psutil.Process().children(recursive=True):
                            child.send_signal(signal.SIGUSR1)
                    os.kill(os.getpid(), signal.SIGUSR1 if args.signal_children else signal.SIGTERM)
                return out

            trainer_mod.Trainer.train_step = step
        result = original_run(cfg)
        captured["result"] = result
        return result

    trainer_mod.run = run_and_capture
    code = train.main(rest)
    result = captured.get("result")
    rank = int(os.environ.get("RANK", os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK", "0"))))
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump({"exit_code": code, "losses": {str(k): v for k, v in (result.losses if result else {}).items()},
                   "iteration": result.iteration if result else None, "reason": result.reason if result else ""}, f)
    sys.exit(0)


if __name__ == "__main__":
    main()
