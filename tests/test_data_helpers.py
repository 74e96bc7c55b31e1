"""megatron-core's C++ dataset helpers: prebuilt in the wheel, or built by ensure_helpers()."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from megatron_harpe.data import helpers


def test_prebuilt_helpers_import():
    # megatron-core 0.16.1's cp311 wheels ship helpers_cpp: nothing to build
    assert helpers.ensure_helpers() == "prebuilt"
    from megatron.core.datasets import helpers as mh
    assert hasattr(mh, "build_sample_idx")


@pytest.fixture(scope="module")
def helpers_cache(tmp_path_factory):
    """One compile for the module (~7 s): into a cache laid out as ensure_helpers() expects."""
    import shutil
    if not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")):
        pytest.skip("no C++ compiler")
    cache = tmp_path_factory.mktemp("helpers-cache")
    old = os.environ.get("HARPE_HELPERS_CACHE")
    os.environ["HARPE_HELPERS_CACHE"] = str(cache)
    try:
        path = helpers.compile_helpers()
    finally:
        if old is None:
            os.environ.pop("HARPE_HELPERS_CACHE")
        else:
            os.environ["HARPE_HELPERS_CACHE"] = old
    return cache, path


def test_build_from_source_matches_prebuilt(helpers_cache):
    """The fallback: compile megatron-core's helpers.cpp (g++ + pybind11) and load it; the
    result computes the same sample index as the prebuilt extension."""
    cache, path = helpers_cache
    assert os.path.isfile(path) and path.startswith(str(cache))
    assert not list(cache.rglob("*.incomplete-*"))
    built = helpers.load_extension(path, "harpe_test_build.helpers_cpp")
    from megatron.core.datasets import helpers_cpp as prebuilt
    assert built is not prebuilt
    sizes = np.array([5, 17, 3, 40, 8, 1, 22], dtype=np.int32)
    rng = np.random.default_rng(0)
    doc_idx = np.concatenate([rng.permutation(7), rng.permutation(7)]).astype(np.int32)
    for seq in (4, 10, 33):
        args = (sizes, doc_idx, seq, 2, int(sizes.sum()), True, 1)
        a = built.build_sample_idx_int32(*args)
        b = prebuilt.build_sample_idx_int32(*args)
        assert np.array_equal(a, b) and a.shape[1] == 2 and a.shape[0] > 1


_HIDDEN_PREBUILT = r"""
import sys
import numpy as np

class HidePrebuilt:  # as if the wheel had no helpers_cpp (source build without pybind11)
    def find_spec(self, name, path=None, target=None):
        if name == "megatron.core.datasets.helpers_cpp":
            raise ImportError("no prebuilt helpers_cpp")
        return None

sys.meta_path.insert(0, HidePrebuilt())
try:
    import megatron.core.datasets.helpers_cpp
    raise SystemExit("the prebuilt module was not hidden")
except ImportError:
    pass
from megatron_harpe.data.helpers import ensure_helpers
print("ENSURE", ensure_helpers())
from megatron.core.datasets import helpers  # megatron-core's own wrapper, on the built module
sizes = np.array([5, 17, 3, 40], dtype=np.int32)
idx = helpers.build_sample_idx(sizes, np.arange(4, dtype=np.int32), 8, 1, int(sizes.sum()))
print("FILE", sys.modules["megatron.core.datasets.helpers_cpp"].__file__, "SAMPLES", idx.shape[0])
"""


def test_ensure_helpers_builds_when_missing(helpers_cache, tmp_path):
    """In a fresh process where the prebuilt module cannot be imported, ensure_helpers() provides
    megatron-core's helpers (from the cache the module fixture filled, so no second compile) and
    megatron-core's own helpers.build_sample_idx works on it."""
    import subprocess
    cache, built = helpers_cache
    env = dict(os.environ, HARPE_HELPERS_CACHE=str(cache), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", _HIDDEN_PREBUILT], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"ENSURE {built}" in proc.stdout
    assert f"FILE {built} SAMPLES " in proc.stdout
