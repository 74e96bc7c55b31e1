"""Name the rank that was lost, in one line, when a run fails because a peer died (issue 23).

What a user sees without this when one rank is killed (SIGKILL, the OOM killer, a node gone): the
launcher's own report - torchrun names the rank and its signal within ~1 s; srun says
"task N: Killed" and `srun --wait` bounds how long the others may go on - and, from every survivor,
a multi-page traceback that ends in something like gloo's "Read error [10.0.0.7]:41234: Connection
reset by peer" (NCCL: an error or a watchdog timeout), which names an address, never a rank. Where
the launcher's report is not in the log (per-rank logs, a node that died with its agent, a launcher
that only says "exit 1"), nothing says which rank went.

`LostRankWatch.run` runs the training under a watch. At start every rank's host, pid, process start
time and pid namespace are gathered once (one all_gather_object) and a client connection to the
launcher's TCPStore is opened (idle until needed). When the training raises what a lost peer raises
(`is_peer_failure`: a c10d error, or a message of gloo's, NCCL's or the store's), the rank looks at
the peers on its own host (/proc: is the process still the one that started?) and puts what it sees
into the store; every survivor that raises does the same, and each waits until every rank is
accounted for - seen alive or gone by some survivor on its host - or LOST_RANK_WAIT_S passed (a host
with no survivor that got as far: a whole node gone, or ranks still blocked in a collective). If some
rank is not alive, the first survivor to finish prints ONE line naming it (rank, host, pid; "gone"
when seen gone, "no answer" otherwise) and the collective error it caused; all survivors exit with
EXIT_LOST_RANK (1: "the machine failed"; not 2/3/75, so train.sbatch requeues it when the attempt
made progress) without their tracebacks (--debug / HARPE_DEBUG=1 prints them). If every rank is
alive, or the error is not one a lost peer causes, it is raised unchanged: a bug stays a traceback.

When the store itself is gone (it lives in rank 0 under srun/mpirun, in torchrun's agent under
torchrun) - seen locally when rank 0 is gone from this host, else when the store does not answer -
the survivors cannot compare notes: each names what it sees on its host and the store's host as the
likely loss; the line is printed once per node.

Nothing runs in the background and the store is not touched unless the training raised: a thread
blocked on the store would be torn from its C++ call at interpreter exit (measured: "terminate called
without an active exception", exit 134, on every normal end of a run under srun).

The exit signals (checkpoint.exit_signals) are held back while an error is on its way to the report
and during it, then delivered: under torchrun the launcher SIGTERMs the survivors within 0.1 s of a
worker's death, and the default action would kill the survivor before it could say which rank it
lost; once it has, the SIGTERM ends it as torchrun asked. Outside that window the signals do exactly
what they did before (the trainer's SignalWatcher, or the default).
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set

from megatron_harpe.cli import EXIT_INTERNAL, debug_requested, first_on_this_node

#: The exit code of a survivor of a lost rank.
EXIT_LOST_RANK = EXIT_INTERNAL
#: How long the rank that raised waits for the others to answer (only a rank with no live process left on
#: its host can keep it waiting that long; torchrun gives a survivor 30 s after its SIGTERM, srun KillWait).
LOST_RANK_WAIT_S = 10.0
_POLL_S = 0.05
_KEY = "harpe/lost-rank"


@dataclass(frozen=True)
class Peer:
    rank: int
    host: str
    pid: int
    started: Optional[str]    # /proc start time: a recycled pid is not mistaken for the rank
    pid_space: Optional[str]  # boot id + pid namespace: where `pid` means this process


def _proc_start(pid: int) -> Optional[str]:
    """The start time of `pid` from /proc, or None if it is gone (or a zombie: exited, not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def _pid_space() -> Optional[str]:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def this_peer(rank: int) -> Peer:
    return Peer(rank, socket.gethostname(), os.getpid(), _proc_start(os.getpid()), _pid_space())


def gone_here(peers: Sequence[Peer], me: Peer) -> Set[int]:
    """The ranks in this pid namespace whose process is gone (exited, killed, or its pid reused)."""
    if me.pid_space is None:
        return set()
    return {p.rank for p in peers if p.pid_space == me.pid_space and _proc_start(p.pid) != p.started}


def _ranges(ranks: Iterable[int]) -> str:
    ranks, out = sorted(ranks), []
    for r in ranks:
        if out and out[-1][1] == r - 1:
            out[-1][1] = r
        else:
            out.append([r, r])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


def describe(lost: Iterable[int], peers: Sequence[Peer], gone: Set[int], waited_s: float) -> str:
    """'rank 1 (node3, pid 4242: gone)' / 'ranks 8-15 (node7: no answer in 10 s)', grouped by host."""
    by_host: Dict[str, List[int]] = {}
    for r in sorted(lost):
        by_host.setdefault(peers[r].host, []).append(r)
    parts = []
    for host, ranks in by_host.items():
        for state, group in (("gone", [r for r in ranks if r in gone]),
                             (f"no answer in {round(waited_s, 1):g} s", [r for r in ranks if r not in gone])):
            if not group:
                continue
            pids = ", ".join(str(peers[r].pid) for r in group[:4]) + (", ..." if len(group) > 4 else "")
            noun = "rank" if len(group) == 1 else "ranks"
            parts.append(f"{noun} {_ranges(group)} ({host}, pid{'s' if len(group) > 1 else ''} {pids}: {state})")
    return "; ".join(parts)


#: What a collective or the store raises when a peer is gone (gloo, NCCL, c10d's TCPStore), lower case.
PEER_FAILURE_WORDS = ("connection reset", "connection closed", "broken pipe", "connection refused", "timed out",
                      "timeout", "nccl", "failed to recv", "recvbytes", "sendbytes", "socket", "watchdog")


def is_peer_failure(err: BaseException) -> bool:
    """Whether `err` (or what caused it) may come from a peer that is gone: the errors worth asking about.
    Anything else - a bug, a bad input that every rank raises - is left alone: had it been asked about, the
    rank raising it last could see the first one already exited and name it "lost"."""
    import torch.distributed as dist

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, dist.DistError) or any(w in str(err).lower() for w in PEER_FAILURE_WORDS):
            return True
        err = err.__cause__ or err.__context__
    return False


def short_error(err: BaseException) -> str:
    """The failed collective's message, first sentence, without gloo's source location prefix."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    text = text.split(". ")[0]
    return f"{type(err).__name__}: {text[:160]}"


class LostRankWatch:
    """See the module doc. `start` on every rank after the process group exists; then `run(body)`."""

    def __init__(self, peers: Sequence[Peer], rank: int, store_addr: str, store_port: int, store_host: str,
                 signals: Sequence[signal.Signals], prog: str = "harpe-train", debug: bool = False,
                 wait_s: float = LOST_RANK_WAIT_S):
        import torch.distributed as dist

        self.peers, self.rank, self.me = list(peers), rank, peers[rank]
        self.store_addr, self.store_port, self.store_host = store_addr, store_port, store_host
        self.signals, self.prog, self.debug, self.wait_s = list(signals), prog, debug, wait_s
        first = self.peers[0]  # a prefix no other launch on the same store shares (torchrun restarts)
        self.prefix = f"{_KEY}/{first.host}-{first.pid}-{first.started}/"
        try:  # the group was just made through this store; should it not answer now, only the report suffers
            self._client = dist.TCPStore(store_addr, store_port, is_master=False, wait_for_workers=False,
                                         timeout=timedelta(seconds=min(wait_s, 5.0)))
        except Exception:  # noqa: BLE001
            self._client = None
        self._deferred: List[int] = []
        self._saved: Dict[int, object] = {}
        self._reporting = False

    @classmethod
    def start(cls, launch, signals: Sequence[signal.Signals], **kw) -> Optional["LostRankWatch"]:
        """Gather who is who (a collective) and connect to the store; None for a world of one."""
        import torch.distributed as dist

        if launch.world_size < 2:
            return None
        peers: list = [None] * dist.get_world_size()
        dist.all_gather_object(peers, this_peer(dist.get_rank()))
        if launch.launcher == "torchrun" and os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
            host = f"torchrun's agent on {launch.master_addr}"
        else:
            host = f"rank 0 on {peers[0].host}"
        return cls(peers, dist.get_rank(), launch.master_addr, launch.master_port, host, signals, **kw)

    def run(self, body: Callable[[], int]) -> int:
        """`body()` with the exit signals held back while an error is on its way here; on an error,
        the report (module doc): EXIT_LOST_RANK if a rank was lost, else the error is raised again."""
        self._saved = {sig: signal.signal(sig, self._on_signal) for sig in self.signals}
        try:
            return body()
        except Exception as err:  # noqa: BLE001 - what a lost peer surfaces as, see is_peer_failure
            if not is_peer_failure(err):
                raise
            self._reporting = True
            line = self._explain(err)
            if line is None:
                raise
            if line:
                print(f"{self.prog}: {line}", file=sys.stderr, flush=True)
            if self.debug or debug_requested():
                traceback.print_exception(err, file=sys.stderr)
            return EXIT_LOST_RANK
        finally:
            for sig, handler in self._saved.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
            deferred, self._deferred, self._reporting = self._deferred, [], False
            for sig in deferred:  # what they would have done had they not been held back (torchrun: end now)
                os.kill(os.getpid(), sig)

    def _on_signal(self, signum, frame) -> None:
        if self._reporting or sys.exc_info()[1] is not None:  # an error is on its way to the report
            self._deferred.append(signum)
            return
        handler = self._saved.get(signum)
        if callable(handler):
            handler(signum, frame)
        elif handler != signal.SIG_IGN:  # the default action, as before
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def _explain(self, err: BaseException) -> Optional[str]:
        """The line to print ('' when another rank prints it), or None when no rank is lost."""
        world = len(self.peers)
        tail = (f" - the run stops (exit {EXIT_LOST_RANK}); a restart resumes from the last checkpoint; "
                f"the collective that failed here: {short_error(err)}")
        store_lost = self.store_host.startswith("rank 0") and 0 in self._look()[1]
        try:
            if store_lost or self._client is None:
                raise ConnectionError("the store's host is gone")
            alive, gone, waited = self._compare_notes()
        except Exception:  # noqa: BLE001 - no store to agree through: say what this host sees, once per node
            gone = self._look()[1]
            store = f"the rendezvous store {self.store_addr}:{self.store_port} ({self.store_host})"
            if not gone:
                head = f"lost {store}, or its node: it does not answer"
            elif store_lost:
                head = f"lost {describe(gone, self.peers, gone, 0)}, {len(gone)} of {world} ranks, which held {store}"
            else:
                head = (f"lost {describe(gone, self.peers, gone, 0)}, {len(gone)} of {world} ranks; {store} does "
                        f"not answer either")
            return head + tail if first_on_this_node(head) else ""
        lost = set(range(world)) - alive
        if not lost:
            return None
        line = f"lost {describe(lost, self.peers, gone, waited)}, {len(lost)} of {world} ranks" + tail
        try:
            first = self._client.add(self.prefix + "told", 1) == 1
        except Exception:  # noqa: BLE001 - the store went while we compared notes: rather twice than never
            first = True
        return line if first else ""

    def _look(self) -> tuple[Set[int], Set[int]]:
        """(alive, gone): the ranks in this pid namespace whose process runs / is gone."""
        if self.me.pid_space is None:
            return {self.rank}, set()
        here = [p for p in self.peers if p.pid_space == self.me.pid_space]
        gone = gone_here(here, self.me)
        return {p.rank for p in here} - gone, gone

    def _compare_notes(self) -> tuple[Set[int], Set[int], float]:
        """Publish what this host sees, read what the other survivors saw; until every rank is accounted for,
        the wait is over, or a held-back exit signal says the launcher is ending this rank.
        Returns (alive, gone, seconds waited)."""
        client, everyone, started = self._client, set(range(len(self.peers))), time.monotonic()
        told: Dict[str, Set[int]] = {"alive": set(), "gone": set()}
        while True:
            for name, seen in zip(("alive", "gone"), self._look()):
                if seen - told[name]:
                    client.append(self.prefix + name, "".join(f"{r}," for r in sorted(seen - told[name])))
                    told[name] |= seen
            alive = self._ranks(client, "alive")
            gone = self._ranks(client, "gone")
            alive -= gone  # seen alive once, gone later: gone
            waited = time.monotonic() - started
            if alive | gone == everyone or waited > self.wait_s or self._deferred:
                return alive, gone, waited
            time.sleep(_POLL_S)

    def _ranks(self, client, name: str) -> Set[int]:
        key = self.prefix + name
        if not client.check([key]):
            return set()
        return {int(r) for r in client.get(key).decode().split(",") if r}
