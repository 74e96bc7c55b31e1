"""The software stack a process runs on: recorded in every checkpoint, compared when one is read back.

Why: a long run is resumed many times, on whatever nodes and container the scheduler gives it, and a
resume on another torch, megatron-core, Transformer Engine, NCCL or driver release changes kernels and
reduction orders without a word: the loss curve bends and nobody can tell why afterwards. So
`models/checkpoint.write_checkpoint` stamps `environment_record()` into every checkpoint's common state
(under ENVIRONMENT_KEY: the trainer's checkpoints and the converter's alike), and whoever reads one back
(a resume, `training.init_from`, `harpe-convert megatron-to-hf`) says what changed in one line
(`environment_changes`). A change is a warning, never an error: upgrading a container mid-run is often
deliberate. harpe-preflight's "Environment" check shows the same record as a table (`describe_environment`).

The record is plain JSON-able data (strings, ints, None), so it survives torch.save, JSON reports and
comparisons across versions of this package alike.
"""
from __future__ import annotations

import functools
import platform
import shutil
import socket
import subprocess
import warnings
from typing import Any, Dict, List, Mapping, Optional, Tuple

#: where write_checkpoint puts the record in a checkpoint's common state
ENVIRONMENT_KEY = "environment"

#: the record's keys in report order, with the name a human reads
LABELS: Dict[str, str] = {
    "python": "Python",
    "torch": "torch",
    "torch_cuda": "CUDA (torch build)",
    "megatron_core": "megatron-core",
    "transformer_engine": "Transformer Engine",
    "triton": "Triton",
    "nccl": "NCCL",
    "gpu_name": "GPU",
    "gpu_count": "GPUs",
    "driver": "NVIDIA driver",
    "hostname": "host",
    "platform": "platform",
}

#: packages whose absence is "not installed" (the other Nones are "none": no CUDA, no GPU, no driver)
_PACKAGES = ("torch", "megatron_core", "transformer_engine", "triton")

#: not compared: a resumed job lands on other nodes (and their kernel patch level) all the time, which
#: changes no numerics by itself
IGNORED_KEYS = ("hostname", "platform")

_NVIDIA_SMI_TIMEOUT_S = 5.0


def environment_record() -> Dict[str, Any]:
    """This process's software stack (see LABELS for the keys); a fresh copy of a per-process cache.

    Computed on the first call, not at import: it imports torch and may run nvidia-smi (never raises:
    what cannot be read is None). Cached because nothing in it changes while the process runs and
    every checkpoint save asks for it."""
    return dict(_cached_record())


@functools.lru_cache(maxsize=None)
def _cached_record() -> Dict[str, Any]:
    import torch

    cuda = _cuda_available(torch)
    gpu_count = _safe(torch.cuda.device_count, 0) if cuda else 0
    return {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "torch_cuda": getattr(torch.version, "cuda", None),
        "megatron_core": _package_version("megatron-core", "megatron_core"),
        # metadata only: importing Transformer Engine initialises CUDA and can take seconds
        "transformer_engine": _package_version("transformer-engine", "transformer_engine",
                                               "transformer-engine-torch", "transformer_engine_torch"),
        "triton": _package_version("triton", "pytorch-triton", "pytorch-triton-rocm"),
        "nccl": _nccl_version(torch) if cuda else None,
        "gpu_name": _safe(lambda: torch.cuda.get_device_name(0), None) if gpu_count else None,
        "gpu_count": int(gpu_count or 0),
        "driver": _driver_version(),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
    }


def environment_changes(saved: Optional[Mapping[str, Any]], current: Mapping[str, Any]) -> List[str]:
    """One line per difference between a checkpoint's record and `current`, e.g. "torch 2.6.0 -> 2.7.1".

    Nothing for a checkpoint without a record (`saved` None: written before records existed) or for a
    key the saved record lacks (an older record), so upgrading this package never raises false alarms;
    IGNORED_KEYS (host, platform) are not compared."""
    if not isinstance(saved, Mapping) or not isinstance(current, Mapping):
        return []
    keys = [k for k in LABELS if k in saved and k in current]
    keys += sorted(k for k in saved if k in current and k not in LABELS)  # a newer record's keys, by name
    return [f"{LABELS.get(key, key)} {_shown(key, saved[key])} -> {_shown(key, current[key])}"
            for key in keys if key not in IGNORED_KEYS and saved[key] != current[key]]


def environment_warning(what: str, changes: List[str], consequence: str) -> str:
    """The one line the readers print: `what` ("checkpoint DIR") names the checkpoint, then every change."""
    return f"{what} was written with another software stack: {', '.join(changes)}; {consequence}"


def describe_environment(record: Mapping[str, Any]) -> List[Tuple[str, str]]:
    """(name, value) rows for a report table, in LABELS order; None reads "not installed" for a package,
    "none" otherwise (no CUDA build, no GPU, no driver). Keys the record lacks are left out."""
    rows = [(LABELS[key], _shown(key, record[key])) for key in LABELS if key in record]
    rows += [(key, _shown(key, record[key])) for key in sorted(record) if key not in LABELS]
    return rows


# ----------------------------------------------------------------------------- helpers
def _shown(key: str, value: Any) -> str:
    if value is None:
        return "not installed" if key in _PACKAGES else "none"
    return str(value)


def _safe(read, default):
    try:
        return read()
    except Exception:  # noqa: BLE001 - a record must never stop a save
        return default


def _cuda_available(torch) -> bool:
    return bool(_safe(torch.cuda.is_available, False))


def _package_version(*names: str) -> Optional[str]:
    """The installed distribution's version under the first of `names` that exists, else None."""
    from importlib.metadata import PackageNotFoundError, version

    for name in names:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
        except Exception:  # noqa: BLE001 - broken metadata reads as absent
            continue
    return None


def _nccl_version(torch) -> Optional[str]:
    """torch's NCCL as "2.21.5" (torch gives a tuple; old releases an int such as 2708 or 21905)."""
    try:
        version = torch.cuda.nccl.version()
    except Exception:  # noqa: BLE001 - a build without NCCL
        return None
    if isinstance(version, (tuple, list)):
        return ".".join(str(part) for part in version)
    if isinstance(version, int):
        major = version // 10000 if version >= 10000 else version // 1000
        rest = version % 10000 if version >= 10000 else version % 1000
        return f"{major}.{rest // 100}.{rest % 100}"
    return str(version)


def _driver_version() -> Optional[str]:
    """The NVIDIA driver release: through NVML (pynvml) when importable, else nvidia-smi, else None."""
    version = _driver_from_nvml()
    return version if version is not None else _driver_from_nvidia_smi()


def _driver_from_nvml() -> Optional[str]:
    try:
        with warnings.catch_warnings():  # the old `pynvml` package warns that it is deprecated
            warnings.simplefilter("ignore")
            import pynvml
    except Exception:  # noqa: BLE001 - not installed, or broken
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver on this machine
        return None
    try:
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # noqa: BLE001
        return None
    finally:
        _safe(pynvml.nvmlShutdown, None)


def _driver_from_nvidia_smi() -> Optional[str]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        done = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=_NVIDIA_SMI_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    return lines[0] if done.returncode == 0 and lines else None
