"""A real single-node Slurm cluster (Debian's Slurm 22.05 + munge) in a fresh directory, for tests.

    cluster = SlurmCluster(tmp_dir)
    cluster.start()                       # own munged, slurmctld, slurmd; ~1-2 s once installed
    job = cluster.sbatch(["--ntasks=2", "slurm/train.sbatch"], env=...)
    info = cluster.wait(job, timeout=300)  # {"JobState": "COMPLETED", "ExitCode": "0:0", "Restarts": "1", ...}
    cluster.stop()                        # SIGTERM (then SIGKILL) by pid file: only what start() started

Everything lives under the directory: slurm.conf, state, spool, logs, pid files, and a private munged
(its own key and socket, named in slurm.conf's AuthInfo), so the cluster neither uses nor disturbs a
munged or a Slurm cluster that something else runs on this machine. The ports are free ones picked at
start, and FirstJobId is random, so that two clusters on one machine (parallel test sessions) do not
collide on ports - neither Slurm's nor the trainer's master port, which is derived from the job id.

`ensure_slurm(install=...)` installs the Debian packages when they are missing (apt-get; root only).
`python -m tests.slurm_cluster start DIR` / `stop DIR` run a cluster by hand (then
`export SLURM_CONF=DIR/slurm.conf`).

Measured recipes behind the settings: ../shared/notes/slurm-and-mpi-on-ci.md (cred_expire=10: a requeued
job starts again after ~12 s instead of 120 s; sched_interval=2; MinJobAge keeps finished jobs visible to
`scontrol show job`, since there is no accounting database).
"""
from __future__ import annotations

import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = {"slurmctld": "/usr/sbin/slurmctld", "slurmd": "/usr/sbin/slurmd", "munged": "/usr/sbin/munged",
            "sbatch": "sbatch", "srun": "srun", "scontrol": "scontrol", "sinfo": "sinfo", "scancel": "scancel"}
# Job states after which nothing more happens (a requeued job passes REQUEUED/PENDING on its way).
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}


class SlurmUnavailable(RuntimeError):
    """Slurm is not installed and may not be installed here (the message says why and how)."""


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing_binaries() -> list[str]:
    return [name for name, path in BINARIES.items() if shutil.which(path) is None]


def ensure_slurm(install: bool, timeout: float = 900) -> float:
    """Make sure Slurm and munge are installed; return the seconds spent installing (0 if present).

    Missing and `install`: `apt-get update && apt-get install -y --no-install-recommends` the Debian
    packages (needs root and apt-get). Missing and not `install`, or not installable: SlurmUnavailable.
    The packages start no daemon (no systemd here); start() starts its own.
    """
    missing = missing_binaries()
    if not missing:
        return 0.0
    how = f"apt-get install -y --no-install-recommends {' '.join(PACKAGES)}"
    if not install:
        raise SlurmUnavailable(f"Slurm is not installed (missing: {', '.join(missing)}). Install it ({how}), or set "
                               "CI=true or HARPE_SLURM_INSTALL=1 to let the tests install it")
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"Slurm is not installed (missing: {', '.join(missing)}) and cannot be installed "
                               f"here ({'not root' if os.geteuid() != 0 else 'no apt-get'}); run {how} as root")
    started = time.monotonic()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                                   f"{proc.stderr[-3000:]}")
    still = missing_binaries()
    if still:
        raise SlurmUnavailable(f"installed {' '.join(PACKAGES)} but still missing: {', '.join(still)}")
    return time.monotonic() - started


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SLURM_CONF = """\
ClusterName=harpetest
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=10
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=2
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.txt
MinJobAge=3600
FirstJobId={first_job_id}
KillWait=10
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime={max_time} State=UP
"""


class SlurmCluster:
    """A single-node Slurm cluster under `root` (which must be new or empty: old state re-runs old jobs).

    `cpus`: what the node declares (SlurmdParameters=config_overrides lets it declare more than the machine
    has, so several small test jobs run at once on a 2-core machine).
    """

    def __init__(self, root: str | os.PathLike, cpus: int = 8, memory_mb: int = 8000, max_time: int = 30):
        self.root = Path(root).resolve()
        self.cpus, self.memory_mb, self.max_time = cpus, memory_mb, max_time
        self.conf = self.root / "slurm.conf"
        self.munge_dir = self.root / "munge"          # key, log, seed: 0700
        self.pid_files = {"slurmd": self.root / "run" / "slurmd.pid",
                          "slurmctld": self.root / "run" / "slurmctld.pid",
                          "munged": self.root / "run" / "munged.pid"}
        self.started_at: float | None = None

    @property
    def munge_socket(self) -> Path | None:
        try:
            return Path((self.root / "munge-socket-dir").read_text().strip()) / "munge.socket"
        except OSError:
            return None

    # ------------------------------------------------------------------ environment
    def env(self, base: dict | None = None, **extra: str) -> dict:
        """An environment for Slurm commands (and for jobs: sbatch exports it) that talks to this cluster."""
        env = dict(os.environ if base is None else base)
        for key in list(env):  # variables of an enclosing Slurm job would leak into the test's jobs
            if key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")):
                del env[key]
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra)
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env())
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()} "
                               f"{proc.stdout.strip()}\n{self.logs_tail()}")
        return proc

    # ------------------------------------------------------------------ start / stop
    def start(self, timeout: float = 60) -> "SlurmCluster":
        if self.root.exists() and any(self.root.iterdir()):
            raise RuntimeError(f"{self.root} is not empty: a Slurm cluster needs a fresh directory "
                               "(old state would re-run old jobs)")
        for sub in ("state", "spool", "run", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.munge_dir.mkdir(mode=0o700)
        # munged wants every directory above its socket searchable by all users, which a test's tmp_path
        # (mode 0700 parents) is not: the socket gets its own directory in /tmp, removed by stop().
        socket_dir = Path(tempfile.mkdtemp(prefix="harpe-munge-", dir="/tmp"))
        socket_dir.chmod(0o755)
        (self.root / "munge-socket-dir").write_text(str(socket_dir))
        key = self.munge_dir / "munge.key"
        key.write_bytes(secrets.token_bytes(128))
        key.chmod(0o600)
        self.conf.write_text(SLURM_CONF.format(
            root=self.root, munge_socket=self.munge_socket, ctld_port=free_port(), slurmd_port=free_port(),
            first_job_id=random.randint(1000, 900000), cpus=self.cpus, memory_mb=self.memory_mb,
            max_time=self.max_time))
        self.started_at = time.monotonic()
        try:
            self._daemon(["/usr/sbin/munged", f"--socket={self.munge_socket}", f"--key-file={key}",
                          f"--pid-file={self.pid_files['munged']}", f"--log-file={self.munge_dir / 'munged.log'}",
                          f"--seed-file={self.munge_dir / 'munged.seed'}"], "munged")
            self._daemon(["/usr/sbin/slurmctld", "-f", str(self.conf)], "slurmctld")
            self._daemon(["/usr/sbin/slurmd", "-f", str(self.conf), "-N", "localhost"], "slurmd")
            deadline = time.monotonic() + timeout
            state = ""
            while time.monotonic() < deadline:
                proc = self.run("sinfo", "-h", "-o", "%T", check=False, timeout=10)
                state = proc.stdout.strip()
                if state == "idle":
                    return self
                time.sleep(0.5)
            raise RuntimeError(f"the Slurm node did not become idle in {timeout:.0f} s (state {state!r})\n"
                               f"{self.logs_tail()}")
        except BaseException:
            self.stop()
            raise

    def _daemon(self, cmd: list[str], name: str, timeout: float = 20) -> None:
        proc = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed to start (exit {proc.returncode}): {proc.stderr.strip()}\n"
                               f"{self.logs_tail()}")
        deadline = time.monotonic() + timeout
        while not self._pid(name):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} wrote no pid file {self.pid_files[name]}\n{self.logs_tail()}")
            time.sleep(0.1)

    def _pid(self, name: str) -> int | None:
        try:
            return int(self.pid_files[name].read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        """Cancel all jobs, then SIGTERM slurmd, slurmctld and munged by their pid files (SIGKILL after 10 s).

        Only processes whose pid file lies in this cluster's directory are signalled, and only if they
        still run the expected program; jobs' processes end with slurmd (linuxproc kills them on cancel).
        """
        if self.conf.exists() and self._pid("slurmctld"):
            self.run("scancel", "--full", "--signal=KILL", "--partition=debug", check=False, timeout=20)
            self.run("scancel", "--partition=debug", check=False, timeout=20)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                proc = self.run("squeue", "-h", "-o", "%i %T", check=False, timeout=10)
                if proc.returncode != 0 or not proc.stdout.strip():
                    break
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self._pid(name)
            if pid is None or not self._is(pid, name):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self._is(pid, name):
                time.sleep(0.1)
            if self._is(pid, name):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        socket = self.munge_socket
        if socket is not None and socket.parent.name.startswith("harpe-munge-") and not self._is(
                self._pid("munged") or -1, "munged"):
            shutil.rmtree(socket.parent, ignore_errors=True)

    @staticmethod
    def _is(pid: int, name: str) -> bool:
        """Is `pid` alive and running `name` (not a zombie, not a recycled pid)?"""
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        comm, state = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()[0]
        return comm == name[:15] and state != "Z"

    # ------------------------------------------------------------------ jobs
    def sbatch(self, args: list[str], env: dict | None = None, cwd: str | os.PathLike | None = None) -> int:
        proc = self.run("sbatch", "--parsable", *args, env=env or self.env(), cwd=cwd)
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int | str) -> dict:
        """`scontrol -o show job ID` as a dict (JobState, ExitCode, Restarts, StdOut, ...); array jobs: the first."""
        proc = self.run("scontrol", "-o", "show", "job", str(job_id), check=False, timeout=20)
        if proc.returncode != 0 or not proc.stdout.strip():
            return {}
        return parse_scontrol(proc.stdout.splitlines()[0])

    def jobs(self, job_id: int | str) -> list[dict]:
        """Every record of `scontrol -o show job ID` (an array job has one per task)."""
        proc = self.run("scontrol", "-o", "show", "job", str(job_id), check=False, timeout=20)
        return [parse_scontrol(line) for line in proc.stdout.splitlines() if line.strip()]

    def wait(self, job_id: int | str, timeout: float, poll: float = 1.0) -> dict:
        """Poll until every record of the job is in a final state; return the (first) record."""
        deadline = time.monotonic() + timeout
        records: list[dict] = []
        while time.monotonic() < deadline:
            records = self.jobs(job_id)
            if records and all(r.get("JobState") in FINAL_STATES for r in records):
                return records[0]
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not finished after {timeout:.0f} s: "
                           f"{[(r.get('JobId'), r.get('JobState'), r.get('Reason')) for r in records]}\n"
                           f"{self.logs_tail()}")

    def logs_tail(self, chars: int = 2500) -> str:
        out = []
        for name in ("log/slurmctld.log", "log/slurmd.log", "munge/munged.log"):
            path = self.root / name
            if path.exists():
                out.append(f"--- {path} ---\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(out)


def parse_scontrol(line: str) -> dict:
    """`Key=Value Key2=Value with spaces ...` (scontrol -o) -> dict; values may contain spaces."""
    out: dict = {}
    for match in re.finditer(r"(\S+?)=(.*?)(?=\s+\S+?=|$)", line.strip()):
        out[match.group(1)] = match.group(2)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: python -m tests.slurm_cluster start|stop DIR", file=sys.stderr)
        return 2
    cluster = SlurmCluster(argv[1])
    if argv[0] == "start":
        ensure_slurm(install=in_ci() or os.environ.get("HARPE_SLURM_INSTALL") == "1")
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
