"""No launcher: a world of one process."""
from __future__ import annotations

import logging
from typing import Mapping

from .env import LaunchInfo, _first, _master_port
from .torchrun import check_no_partial_env_url

log = logging.getLogger(__name__)


def read_single(env: Mapping[str, str]) -> LaunchInfo:
    """Rank 0 of 1; LaunchError if a partial env:// set says otherwise.

    Warns when Slurm's job variables promise more tasks: the sbatch script or a salloc shell ran the
    trainer directly instead of through srun (one process, not rank 0 of N, which would hang).
    """
    check_no_partial_env_url(env)
    ntasks = _first(env, "SLURM_NTASKS", "SLURM_NPROCS")
    if ntasks and env[ntasks].strip().isdigit() and int(env[ntasks]) > 1:
        log.warning("%s=%s but this process was not started by srun (no SLURM_STEP_ID): running as a single "
                    "process. Start the trainer with `srun` to get %s ranks.", ntasks, env[ntasks], env[ntasks])
    port = _master_port(env, "single", 0)  # 0: init_distributed lets the store pick a free port
    return LaunchInfo("single", 0, 1, 0, 1, env.get("MASTER_ADDR", "").strip() or "127.0.0.1", port, None)
