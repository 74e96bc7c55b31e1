"""Slurm helpers for the scripts in slurm/: the run directory a config names (runinfo) and the
experiment-grid submitter `harpe-sweep` (sweep). See docs/slurm.md."""
