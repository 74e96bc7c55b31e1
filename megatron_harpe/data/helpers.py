"""megatron-core's C++ dataset helpers (``megatron.core.datasets.helpers_cpp``), always available.

What megatron-core 0.16.1 does: GPTDataset (``build_sample_idx``) and BlendedDataset
(``build_blending_indices``) import ``megatron.core.datasets.helpers_cpp``, a pybind11
extension built from ``helpers.cpp``. The 0.16.1 wheels on PyPI (cp311, x86_64 and aarch64)
ship it prebuilt, so a normal ``pip install`` needs nothing. A source build (sdist, other
Python or platform) builds it as an *optional* extension: without pybind11 at build time it
is silently left out, and megatron-core's own fallback ``compile_helpers()`` runs
``make -C <package dir>``, whose Makefile the wheel does not ship.

:func:`ensure_helpers` covers that case: when the import fails it compiles the ``helpers.cpp``
that megatron-core ships with the C++ compiler (``$CXX`` or g++) and pybind11's headers (a
dependency of megatron-harpe) into a per-user cache, under a file lock (several ranks may
call it at once), and registers the module under megatron-core's name. The trainer calls it
before building datasets; ``build_gpt_datasets`` does too.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig

__all__ = ["ensure_helpers", "compile_helpers", "helpers_source", "load_extension", "HelpersError"]

_MODULE = "megatron.core.datasets.helpers_cpp"


class HelpersError(RuntimeError):
    pass


def helpers_source() -> str:
    import megatron.core.datasets as ds

    return os.path.join(os.path.dirname(ds.__file__), "helpers.cpp")


def _cache_dir() -> str:
    base = os.environ.get("HARPE_HELPERS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "megatron_harpe", "helpers")
    return base


def compile_helpers(output_dir: str | None = None) -> str:
    """Compile megatron-core's helpers.cpp; returns the path of the extension (cached by source hash)."""
    src = helpers_source()
    if not os.path.isfile(src):
        raise HelpersError(f"megatron-core's helpers.cpp is missing ({src}); reinstall megatron-core")
    try:
        import pybind11
    except ImportError:
        raise HelpersError("building megatron-core's dataset helpers needs pybind11: pip install pybind11") from None
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not cxx:
        raise HelpersError("no C++ compiler (g++/clang++) to build megatron-core's dataset helpers; install one "
                           "(apt-get install g++) or set CXX")
    with open(src, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    out_dir = output_dir or os.path.join(_cache_dir(), f"{digest}-{sys.implementation.cache_tag}")
    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, "helpers_cpp" + suffix)
    if os.path.isfile(target):
        return target
    lock_path = os.path.join(out_dir, ".lock")
    with open(lock_path, "w") as lock:
        try:
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: no concurrent builds expected
            pass
        if os.path.isfile(target):
            return target
        tmp = f"{target}.incomplete-{os.getpid()}"
        includes = [f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
        cmd = [cxx, "-O3", "-Wall", "-shared", "-std=c++17", "-fPIC", *includes, src, "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            try:
                os.remove(tmp)
            except FileNotFoundError:
                pass
            raise HelpersError(f"compiling megatron-core's dataset helpers failed:\n  {' '.join(cmd)}\n"
                               f"{proc.stderr[-4000:]}")
        os.replace(tmp, target)
    return target


def load_extension(path: str, name: str = _MODULE):
    """Import the extension at `path` as module `name` (its last component must be helpers_cpp)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ensure_helpers(verbose: bool = False) -> str:
    """Make ``megatron.core.datasets.helpers_cpp`` importable; returns 'prebuilt' or the built path."""
    try:
        importlib.import_module(_MODULE)
        return "prebuilt"
    except ImportError:
        pass
    path = compile_helpers()
    module = load_extension(path)
    sys.modules[_MODULE] = module
    import megatron.core.datasets as ds

    ds.helpers_cpp = module
    if verbose:
        print(f"megatron_harpe: built megatron-core dataset helpers at {path}", file=sys.stderr)
    return path
