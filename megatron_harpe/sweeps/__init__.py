"""Experiment sweeps and the run directories they make, read without torch: `harpe-sweep` expands a grid
(sweep; from a YAML grid file: grid_file) and submits it as Slurm jobs or runs it on this machine point after
point (local), records it in sweep.json (manifest) and reports on it from the run directories (runs, report).
runinfo answers, for one config, where its run lives and which checkpoint a resume starts from (slurm/train.sbatch
asks it before every attempt). See docs/sweeps.md, docs/slurm.md.

Named for what it holds, not for one scheduler: the Slurm batch scripts live in the top-level slurm/, and the
check that MPI sees the world srun started lives with the other launcher code (parallel/launch/mpicheck.py)."""
