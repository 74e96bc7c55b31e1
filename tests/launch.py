"""Run a worker script under torchrun with real gloo process groups.

Multi-process tests pay ~4-5 s of start-up (torchrun + importing megatron-core) per
launch, so each worker script runs many scenarios in one launch and writes its results
to a JSON file per rank; the pytest side then asserts on them scenario by scenario.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_workers(script: str | Path, nproc: int, out_dir: Path, *args: str, timeout: int = 600,
                extra_env: dict | None = None) -> list[dict]:
    """Launch `script` on `nproc` gloo ranks; return each rank's JSON result.

    The worker receives `--out DIR` and must write DIR/rank{RANK}.json. A non-zero exit
    fails with the workers' combined output, so a broken rank is diagnosable from the
    pytest report alone.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")})
    if extra_env:
        env.update(extra_env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={nproc}",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(script), "--out", str(out_dir), *args]
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"workers failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                             f"--- stdout ---\n{proc.stdout[-8000:]}\n--- stderr ---\n{proc.stderr[-12000:]}")
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(nproc)]
