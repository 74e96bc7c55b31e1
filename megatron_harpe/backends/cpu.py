"""The CPU backend: megatron-core's CUDA-only training path, run on CPU with gloo.

megatron-core assumes CUDA everywhere: it allocates on ``device="cuda"`` /
``torch.cuda.current_device()`` (pipeline schedules, p2p shapes, DDP buffers, optimizer
``found_inf``, clip_grads, masks, RoPE), calls ``torch.cuda.synchronize``/streams/events/
NVTX, keeps its RNG streams in the CUDA generator, and checks ``Tensor.type()`` strings.
Rather than patching ~190 call sites (which would not survive a megatron-core upgrade),
this module makes a CPU-only torch *look like* a one-GPU CUDA build whose device is the
CPU. megatron-core itself is not changed.

This is the ONLY place in the project allowed to adapt megatron-core/torch behaviour, and
it is enabled only by :func:`megatron_harpe.backends.setup_backend` when CUDA is absent
(or CPU is forced). Each adaptation is one small function below, registered in
``ADAPTATIONS`` by name:

``cuda_device_to_cpu``
    A ``TorchFunctionMode`` rewrites CUDA devices (``"cuda"``, ``"cuda:N"``, an int
    ordinal, ``torch.device("cuda")``) to CPU in every torch call's ``device=`` keyword and
    in ``Tensor.to(...)``, and drops ``pin_memory=True``. Why: ~190 megatron-core call
    sites allocate on CUDA; a CPU build raises "Torch not compiled with CUDA enabled".
``cuda_tensor_methods``
    In the same mode ``Tensor.cuda()`` and ``Tensor.pin_memory()`` return the tensor and
    ``Tensor.record_stream()`` does nothing. Why: the CPU *is* the device here, so a
    tensor is already "on it" (the same object comes back, as ``.to()`` of a tensor already
    on the target device does); pinning needs an accelerator; record_stream rejects
    non-CUDA streams.
``cuda_tensor_type_names``
    ``Tensor.type()`` reports ``'torch.cuda.FloatTensor'``-style names (and ``.type(..)``
    accepts them). Why: ``clip_grads`` asserts ``grad.type() == 'torch.cuda.FloatTensor'``
    and the optimizers choose their fp32/fp16 paths by these strings.
``current_device_zero``
    ``torch.cuda.current_device()`` returns 0, which the mode maps to CPU. Why: it is the
    most common device argument in megatron-core; a CPU build raises.
    ``torch.cuda.device_count()`` stays 0 and ``is_available()`` False, so megatron-core
    keeps its no-CUDA branches (no Transformer Engine import, straggler detector off) and
    torch's own bookkeeping (``fork_rng``, DataLoader pinning) treats the machine as CPU.
``set_device_noop``
    ``torch.cuda.set_device`` accepts and ignores a device. Why: launch code and
    megatron's checkpoint worker select "the local GPU"; a CPU build raises.
``synchronize_noop``
    ``torch.cuda.synchronize`` does nothing. Why: CPU ops are synchronous; a CPU build
    raises (p2p communication, timers, checkpointing call it).
``streams_and_events``
    ``torch.cuda.Stream/current_stream/default_stream/stream/set_stream/Event`` are
    stand-ins: one stream, waits are no-ops, events record wall time. Why: DDP's
    overlapped grad reduction, p2p and offloading code create and wait on streams.
``nvtx_noop``
    NVTX ranges become no-ops. Why: megatron brackets regions with
    ``torch.cuda.nvtx.range_push/pop``; a CPU build raises "NVTX functions not installed".
``cuda_rng_is_cpu_rng``
    ``torch.cuda.get_rng_state/set_rng_state/manual_seed/.../default_generators`` act on
    the CPU default generator (the one CPU dropout/init draw from). Why: megatron's
    ``CudaRNGStatesTracker`` keeps per-TP-rank streams in the CUDA generator; on a CPU
    build the getters raise and the setters are silently deferred forever.
``lazy_cuda_calls_run_now``
    ``torch.cuda._lazy_call(cb)`` runs ``cb`` at once (it also rebinds the name inside
    already imported megatron modules). Why: CUDA is never "initialized" here, so torch
    queues the callback forever; megatron's ``_set_cuda_rng_state`` goes through it, so
    ``get_cuda_rng_tracker().fork()`` would silently never switch or restore RNG state.
    megatron imports the name directly, so this must happen before megatron is imported.
``quiet_shared_rng_warning``
    Drops megatron's "CPU RNG state changed within GPU RNG context" log record. Why: with
    one shared generator every ``fork()`` that draws random numbers changes "the CPU
    state" by construction; the warning would fire on every dropout in a forked region.
``mode_in_backward``
    The device mode is re-entered for the duration of every autograd backward
    (``torch.autograd.graph._engine_run_backward``). Why: ``Tensor.backward`` and
    ``torch.autograd.backward/grad`` themselves dispatch through ``__torch_function__``;
    a mode is switched off while its own handler runs, so the whole backward pass (custom
    ``Function.backward`` such as the sequence-parallel reduce-scatter, DDP's grad hooks)
    ran without it and allocated on CUDA. Re-entering at the engine call covers custom
    functions, tensor hooks and grad-accumulator hooks alike.
``hide_real_cuda``
    Only when CPU is forced on a machine that has CUDA: ``is_available()`` False and
    ``device_count()`` 0, so megatron and torch take the same CPU branches as on a laptop.

Limitations (documented, not patched):

* A ``TorchFunctionMode`` is per thread. It is installed for the thread that calls
  :func:`enable` (the main thread) and propagated by autograd into its engine threads.
  Other threads run without it; a helper thread that allocates on CUDA must call
  :func:`enable_in_current_thread` first. megatron's async checkpoint writers only write
  tensors already copied ``.to("cpu")`` (and the "fork" writer inherits the forking
  thread's mode), so they need nothing.
* Spawned processes (megatron's persistent async-checkpoint worker) start without the
  backend; they get it only if the entry script calls ``setup_backend()`` at import time.
* ``Tensor.device`` is honestly ``cpu`` and ``Tensor.is_cuda`` False: code that compares
  devices with ``torch.device("cuda", i)`` sees the truth.
* Cost: ~1 us of Python per torch call made from Python (see docs/cpu_backend.md).

Set ``HARPE_CPU_BACKEND_SKIP=name1,name2`` to leave named adaptations out; this exists to
prove each adaptation is needed (the tests fail without it), not for normal use.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Callable

import torch
import torch.autograd
import torch.autograd.graph
import torch.cuda
import torch.cuda.nvtx
import torch.cuda.random
from torch.overrides import TorchFunctionMode

_Tensor = torch.Tensor
_CPU = torch.device("cpu")

_ORIGINALS: dict[tuple[int, str], Any] = {}


def _patch(owner: Any, name: str, value: Any) -> None:
    """Set ``owner.name = value``, remembering the original for :func:`original`."""
    key = (id(owner), name)
    if key not in _ORIGINALS:
        _ORIGINALS[key] = getattr(owner, name, None)
    setattr(owner, name, value)


def original(owner: Any, name: str) -> Any:
    """The value ``owner.name`` had before the backend patched it (for tests and diagnostics)."""
    return _ORIGINALS.get((id(owner), name), getattr(owner, name))


# ----------------------------------------------------------------------------------------
# The device mode
# ----------------------------------------------------------------------------------------


def _is_cuda_device(device: Any) -> bool:
    """True for the ways megatron names a CUDA device: "cuda[:N]", an int ordinal, torch.device."""
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)


def _cpu_kwargs(kwargs: dict) -> dict:
    """Return `kwargs` with a CUDA ``device=`` rewritten to CPU and ``pin_memory`` dropped."""
    kwargs = dict(kwargs)
    if _is_cuda_device(kwargs.get("device")):
        kwargs["device"] = _CPU
    kwargs.pop("pin_memory", None)
    return kwargs


class CudaToCpuMode(TorchFunctionMode):
    """Routes every torch call made from Python to CPU (see the module docstring).

    The common path is one dict lookup plus, only when keywords are present, one or two
    membership tests; special tensor methods are handled by functions in ``handlers``,
    registered by the adaptations.
    """

    def __init__(self) -> None:
        super().__init__()
        self.handlers: dict[Callable, Callable] = {}
        self.rewrite_kwargs = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        handler = self.handlers.get(func)
        if handler is not None:
            return handler(func, args, kwargs or {})
        if not kwargs:
            return func(*args)
        if self.rewrite_kwargs and ("device" in kwargs or "pin_memory" in kwargs):
            kwargs = _cpu_kwargs(kwargs)
        return func(*args, **kwargs)


_MODE = CudaToCpuMode()


def _mode_is_active() -> bool:
    """Whether the device mode is on the calling thread's torch-function mode stack."""
    stack_len = torch._C._len_torch_function_stack()
    return any(torch._C._get_function_stack_at(i) is _MODE for i in range(stack_len))


def enable_in_current_thread() -> None:
    """Install the device mode in the calling thread (modes are per thread). Idempotent."""
    if not _mode_is_active():
        _MODE.__enter__()


def _tensor_to_cpu(func, args, kwargs):
    """``Tensor.to(device, ...)``: a positional or keyword CUDA device becomes CPU."""
    if len(args) > 1 and _is_cuda_device(args[1]):  # .to(device[, dtype, ...]); args[0] is the tensor
        args = (args[0], _CPU, *args[2:])
    if kwargs:
        if "device" in kwargs or "pin_memory" in kwargs:
            kwargs = _cpu_kwargs(kwargs)
        return func(*args, **kwargs)
    return func(*args)


def _return_self(func, args, kwargs):
    """``Tensor.cuda()`` / ``Tensor.pin_memory()``: the tensor is already on the device."""
    return args[0]


def _do_nothing(func, args, kwargs):
    """``Tensor.record_stream(stream)``: there is one stream; nothing to record."""
    return None


def _cuda_type_name(func, args, kwargs):
    """``Tensor.type()`` -> 'torch.cuda.FloatTensor'; ``.type('torch.cuda.X')`` -> torch.X."""
    if len(args) == 1 and not kwargs:
        name = func(*args)
        return name if name.startswith("torch.cuda.") else "torch.cuda." + name[len("torch."):]
    args = list(args)
    dtype = args[1] if len(args) > 1 else kwargs.get("dtype")
    if isinstance(dtype, type):  # a legacy type object such as torch.cuda.FloatTensor
        dtype = f"{dtype.__module__}.{dtype.__name__}"
    if isinstance(dtype, str):
        dtype = dtype.replace("torch.cuda.", "torch.")
        if len(args) > 1:
            args[1] = dtype
        else:
            kwargs = {**kwargs, "dtype": dtype}
    return func(*args, **kwargs)


def _install_device_mode() -> None:
    """Adaptation ``cuda_device_to_cpu``: CUDA devices in torch calls become CPU.

    megatron-core creates tensors with ``device="cuda"``, ``device=torch.cuda.current_device()``
    and ``.to("cuda")`` in ~190 places; a CPU build of torch raises on each of them.
    """
    _MODE.rewrite_kwargs = True
    _MODE.handlers[_Tensor.to] = _tensor_to_cpu
    enable_in_current_thread()


def _install_cuda_tensor_methods() -> None:
    """Adaptation ``cuda_tensor_methods``: ``.cuda()``/``.pin_memory()`` return self, record_stream no-op.

    megatron calls ``.cuda()`` on host tensors (``tensor_parallel.broadcast_data``, RoPE
    tables, tied-embedding setup, checkpoint shard exchange, grad-scaler state),
    ``pin_memory()`` for offloading and ``record_stream`` for its stream overlap; on a CPU
    build they raise ("not compiled with CUDA", "no accelerator", no CPU kernel for record_stream).
    """
    _MODE.handlers[_Tensor.cuda] = _return_self
    _MODE.handlers[_Tensor.pin_memory] = _return_self
    _MODE.handlers[_Tensor.record_stream] = _do_nothing
    enable_in_current_thread()


def _install_cuda_type_names() -> None:
    """Adaptation ``cuda_tensor_type_names``: ``Tensor.type()`` names the CUDA tensor types.

    megatron-core's ``clip_grad_by_total_norm_fp32`` asserts ``grad.type() == 'torch.cuda.FloatTensor'``
    and ``Float16OptimizerWithFloat16Params``/``DistributedOptimizer`` raise on any other
    name; on CPU torch says 'torch.FloatTensor'.
    """
    _MODE.handlers[_Tensor.type] = _cuda_type_name
    enable_in_current_thread()


# ----------------------------------------------------------------------------------------
# torch.cuda stand-ins
# ----------------------------------------------------------------------------------------


class CpuEvent:
    """Stand-in for ``torch.cuda.Event``: records wall-clock time; waits are no-ops."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self.time: float | None = None

    def record(self, stream=None) -> None:
        self.time = time.perf_counter()

    def wait(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end_event: "CpuEvent") -> float:
        """Milliseconds between two recorded events, as torch.cuda.Event reports it."""
        if self.time is None or end_event.time is None:
            raise RuntimeError("elapsed_time needs both events recorded")
        return (end_event.time - self.time) * 1000.0


class CpuStream(torch.Stream):
    """Stand-in for ``torch.cuda.Stream``: CPU work is already ordered, so waits are no-ops.

    It is a (CPU) ``torch.Stream`` so that torch's argument parser accepts it where a
    stream is expected, e.g. ``Tensor.record_stream(torch.cuda.current_stream())``.
    """

    cuda_stream = 0

    def __new__(cls, device=None, priority: int = 0, **kwargs):
        return super().__new__(cls, device=_CPU, priority=priority)

    def __init__(self, device=None, priority: int = 0, **kwargs):
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event: CpuEvent | None = None) -> CpuEvent:
        event = event if event is not None else CpuEvent()
        event.record(self)
        return event

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


_STREAM = CpuStream()


def _current_device_is_zero() -> None:
    """Adaptation ``current_device_zero``: ``torch.cuda.current_device()`` returns 0.

    It is megatron-core's most common device argument (175 call sites); a CPU build raises
    "Torch not compiled with CUDA enabled". The device mode maps ordinal 0 to CPU.
    """
    _patch(torch.cuda, "current_device", lambda: 0)


def _set_device_noop() -> None:
    """Adaptation ``set_device_noop``: ``torch.cuda.set_device(d)`` is accepted and ignored.

    Launch code selects "the local GPU" this way; a CPU build raises AttributeError
    (``torch._C._cuda_setDevice`` does not exist).
    """
    _patch(torch.cuda, "set_device", lambda device: None)


def _synchronize_noop() -> None:
    """Adaptation ``synchronize_noop``: ``torch.cuda.synchronize()`` does nothing.

    CPU ops complete before they return; a CPU build raises. p2p communication, timers
    and checkpoint saving call it.
    """
    _patch(torch.cuda, "synchronize", lambda device=None: None)


def _streams_and_events() -> None:
    """Adaptation ``streams_and_events``: one stand-in stream, no-op stream contexts, timing events.

    DDP's overlapped grad reduction creates a ``torch.cuda.Stream`` and enters
    ``torch.cuda.stream(...)``; p2p/offload code waits on ``current_stream()``; a CPU build
    raises on each ("requires CUDA support", "dummy base class Event").
    """
    _patch(torch.cuda, "Stream", CpuStream)
    _patch(torch.cuda, "Event", CpuEvent)
    _patch(torch.cuda, "current_stream", lambda device=None: _STREAM)
    _patch(torch.cuda, "default_stream", lambda device=None: _STREAM)
    _patch(torch.cuda, "stream", lambda stream=None: nullcontext())
    _patch(torch.cuda, "set_stream", lambda stream: None)


class _NvtxNoop:
    """Stand-in for ``torch._C._nvtx``; torch.cuda.nvtx's wrappers call through it."""

    depth = 0

    def rangePushA(self, msg):
        self.depth += 1
        return self.depth - 1

    def rangePop(self):
        self.depth = max(0, self.depth - 1)
        return self.depth

    def markA(self, msg):
        pass

    def rangeStartA(self, msg):
        return 0

    def rangeEnd(self, range_id):
        pass

    def deviceRangeStart(self, msg, stream):
        return None

    def deviceRangeEnd(self, range_handle, stream):
        pass


def _nvtx_noop() -> None:
    """Adaptation ``nvtx_noop``: NVTX ranges (``torch.cuda.nvtx.range_push/pop/range/mark``) do nothing.

    megatron brackets schedules and layers with NVTX; a CPU build's stub raises "NVTX
    functions not installed". Replacing torch's ``_nvtx`` binding keeps the public
    wrappers, including names imported directly (``from torch.cuda.nvtx import range_push``).
    """
    _patch(torch.cuda.nvtx, "_nvtx", _NvtxNoop())


# ----------------------------------------------------------------------------------------
# RNG
# ----------------------------------------------------------------------------------------


def _cpu_get_rng_state(device="cuda") -> torch.Tensor:
    return torch.default_generator.get_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device="cuda") -> None:
    torch.default_generator.set_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _cuda_rng_is_cpu_rng() -> None:
    """Adaptation ``cuda_rng_is_cpu_rng``: the CUDA RNG API acts on the CPU default generator.

    megatron's ``CudaRNGStatesTracker.add/fork`` and ``model_parallel_cuda_manual_seed`` use
    ``torch.cuda.get_rng_state``/``manual_seed``/``default_generators[i]``; on a CPU build the
    getter raises and ``manual_seed``/``set_rng_state`` are queued forever, so every
    "tensor-parallel RNG stream" would silently be the default one. CPU ops (dropout,
    init) draw from ``torch.default_generator``, so that is the generator to switch.
    """
    functions = {
        "get_rng_state": _cpu_get_rng_state,
        "set_rng_state": _cpu_set_rng_state,
        "get_rng_state_all": lambda: [_cpu_get_rng_state()],
        "set_rng_state_all": lambda new_states: _cpu_set_rng_state(list(new_states)[0]),
        "manual_seed": _cpu_manual_seed,
        "manual_seed_all": _cpu_manual_seed,
        "seed": lambda: torch.default_generator.seed(),
        "seed_all": lambda: torch.default_generator.seed(),
        "initial_seed": lambda: torch.default_generator.initial_seed(),
    }
    for name, function in functions.items():
        _patch(torch.cuda, name, function)
        _patch(torch.cuda.random, name, function)
    _patch(torch.cuda, "default_generators", (torch.default_generator,))


def _run_now(callable: Callable, **kwargs) -> None:
    callable()


def _lazy_cuda_calls_run_now() -> None:
    """Adaptation ``lazy_cuda_calls_run_now``: ``torch.cuda._lazy_call(cb)`` calls ``cb()`` at once.

    torch defers these callbacks until CUDA initializes, which never happens here.
    megatron's ``_set_cuda_rng_state`` (used by the RNG tracker's ``add`` and ``fork``) goes
    through it, so without this ``fork()`` never switches to, nor restores from, the
    tracked state. megatron does ``from torch.cuda import _lazy_call``: patch before it is
    imported; modules already imported have their copy of the name rebound here.
    """
    lazy_call = original(torch.cuda, "_lazy_call")
    _patch(torch.cuda, "_lazy_call", _run_now)
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron") and getattr(module, "_lazy_call", None) is lazy_call:
            _patch(module, "_lazy_call", _run_now)


class _DropSharedRngWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _quiet_shared_rng_warning() -> None:
    """Adaptation ``quiet_shared_rng_warning``: drop megatron's "CPU RNG state changed" log line.

    ``CudaRNGStatesTracker.fork`` compares the CPU RNG state before and after the forked
    region; CUDA and CPU RNG are one generator here, so any dropout in the region
    "changes the CPU state" and the warning fires on every call.
    """
    logger = logging.getLogger("megatron.core.tensor_parallel.random")
    if not any(isinstance(f, _DropSharedRngWarning) for f in logger.filters):
        logger.addFilter(_DropSharedRngWarning())


# ----------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------


def _mode_in_backward() -> None:
    """Adaptation ``mode_in_backward``: the device mode is active during every backward pass.

    ``Tensor.backward`` and ``torch.autograd.backward/grad`` dispatch through
    ``__torch_function__``, and torch switches a mode off while its own handler runs, so
    the engine ran custom ``Function.backward`` (megatron's sequence-parallel
    reduce-scatter allocates with ``device=torch.cuda.current_device()``) and grad hooks
    without it. The engine captures the caller's torch-function state, so pushing the
    mode around ``_engine_run_backward`` (which both entry points call) covers them all.
    """
    engine_run_backward = original(torch.autograd.graph, "_engine_run_backward")

    def engine_run_backward_with_mode(*args, **kwargs):
        if _mode_is_active():
            return engine_run_backward(*args, **kwargs)
        with _MODE:
            return engine_run_backward(*args, **kwargs)

    _patch(torch.autograd.graph, "_engine_run_backward", engine_run_backward_with_mode)
    _patch(torch.autograd, "_engine_run_backward", engine_run_backward_with_mode)


# ----------------------------------------------------------------------------------------
# forced CPU on a CUDA machine
# ----------------------------------------------------------------------------------------


def _hide_real_cuda() -> None:
    """Adaptation ``hide_real_cuda``: when CPU is forced on a CUDA machine, report no CUDA.

    megatron-core branches on ``torch.cuda.is_available()`` (Transformer Engine imports,
    straggler detector); the CPU backend must take the same branches everywhere.
    """
    if original(torch.cuda, "is_available")():
        _patch(torch.cuda, "is_available", lambda: False)
        _patch(torch.cuda, "device_count", lambda: 0)


# ----------------------------------------------------------------------------------------

ADAPTATIONS: dict[str, Callable[[], None]] = {
    "hide_real_cuda": _hide_real_cuda,
    "cuda_rng_is_cpu_rng": _cuda_rng_is_cpu_rng,
    "lazy_cuda_calls_run_now": _lazy_cuda_calls_run_now,
    "quiet_shared_rng_warning": _quiet_shared_rng_warning,
    "current_device_zero": _current_device_is_zero,
    "set_device_noop": _set_device_noop,
    "synchronize_noop": _synchronize_noop,
    "streams_and_events": _streams_and_events,
    "nvtx_noop": _nvtx_noop,
    "cuda_device_to_cpu": _install_device_mode,
    "cuda_tensor_methods": _install_cuda_tensor_methods,
    "cuda_tensor_type_names": _install_cuda_type_names,
    "mode_in_backward": _mode_in_backward,
}

_ENABLED: list[str] = []
_LOCK = threading.Lock()


def enable() -> list[str]:
    """Apply every adaptation once (skipping those named in HARPE_CPU_BACKEND_SKIP).

    Returns the names applied. Idempotent: a second call changes nothing (other than
    installing the mode in a calling thread that lacks it).
    """
    with _LOCK:
        if not _ENABLED:
            skip = {s.strip() for s in os.environ.get("HARPE_CPU_BACKEND_SKIP", "").split(",") if s.strip()}
            unknown = skip - ADAPTATIONS.keys()
            if unknown:
                raise ValueError(f"HARPE_CPU_BACKEND_SKIP names unknown adaptations {sorted(unknown)}; "
                                 f"known: {sorted(ADAPTATIONS)}")
            for name, adapt in ADAPTATIONS.items():
                if name not in skip:
                    adapt()
                    _ENABLED.append(name)
        elif any(n in _ENABLED for n in ("cuda_device_to_cpu", "cuda_tensor_methods", "cuda_tensor_type_names")):
            enable_in_current_thread()
        return list(_ENABLED)


def enabled_adaptations() -> list[str]:
    """Names of the adaptations in effect (empty when the backend is off)."""
    return list(_ENABLED)


@contextmanager
def mode_suspended():
    """Run a block without the device mode (e.g. to time or inspect plain torch)."""
    if not _mode_is_active():
        yield
        return
    stack = []
    while _mode_is_active():
        stack.append(torch.overrides._pop_mode())
    try:
        yield
    finally:
        for mode in reversed(stack):
            torch.overrides._push_mode(mode)
