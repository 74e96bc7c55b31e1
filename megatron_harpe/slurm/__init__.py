"""Slurm helpers for the scripts in slurm/: the run directory a config names (runinfo), and experiment
grids: `harpe-sweep` submits one (sweep) or runs it on this machine (local), records it in sweep.json
(manifest) and reports on it from the run directories (runs, report). See docs/slurm.md, docs/sweeps.md."""
