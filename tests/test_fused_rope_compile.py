"""Ahead-of-time compile of the fused HARPE RoPE kernel for sm_90 (H100/H200) and sm_100 (B200), no GPU.

Every launch variant the trainer can select - forward/backward, sbhd/thd, CP=1/CP>1, half/interleaved
pairs, full rotary or rotary_percent < 1 (PASS > 0, rot_dim not a power of two), fp32/bf16/fp16 - is
compiled by Triton's real pipeline (ttir -> ttgir -> llir -> ptx -> cubin with the bundled ptxas) for
an explicit target, and its PTX must hold no `sin.approx` / `cos.approx` (the kernel promises
libdevice's precise sinf/cosf, see the docstring of megatron_harpe/rope/fused_kernel.py).

Nothing is restated by hand: a worker subprocess (TRITON_INTERPRET removed from its environment, its
own TRITON_CACHE_DIR) builds the kernel with `_build_kernel()`, takes each variant's (grid, args,
constexprs) from `_launch_args` - the function `_launch` launches with - on real CPU tensors of the
variant's shapes, and compiles them through `JITFunction.warmup`, which specialises the arguments
(types, divisibility by 16, ints equal to 1) exactly as a launch does. Only Triton's driver is replaced
by a stub that names the target (`GPUTarget("cuda", arch, 32)`); the device id is the arch, so both
targets can share one process's kernel caches. The autotune configs are the kernel's own
(`Autotuner.configs`); the tested process keeps TRITON_INTERPRET=1 and its interpreted kernel.

Default: the 32 branch combinations, dtype and autotune config cycled over them (every dtype meets
every flag value and every config), per arch. HARPE_AOT_FULL=1: all 96 (combination, dtype) variants
x all configs (slow: ~12 min on 2 cores). A negative control compiles a throwaway kernel using libdevice's
fast_sinf/fast_cosf the same way and requires the detector to find `sin.approx` / `cos.approx` there.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARCHS = (90, 100)
DTYPES = ("float32", "bfloat16", "float16")
FLAGS = ("backward", "thd", "cp", "interleaved", "partial")
FULL = os.environ.get("HARPE_AOT_FULL") == "1"
APPROX = re.compile(r"\b(?:sin|cos)\.approx\b[.\w]*")
# store conversions a GPU launch must use (the hardware's round-to-nearest-even; SOFT_BF16 is interpreter-only)
CVT = {"bfloat16": re.compile(r"cvt\.rn\.bf16"), "float16": re.compile(r"cvt\.rn\.f16")}


def variants(full: bool = FULL):
    """[(name, flags dict, dtype, config selector)]: config selector is an int (index modulo the number of
    autotune configs) or None (all configs)."""
    out = []
    for i, bits in enumerate(itertools.product((False, True), repeat=len(FLAGS))):
        flags = dict(zip(FLAGS, bits))
        base = "-".join(("bwd" if flags["backward"] else "fwd", "thd" if flags["thd"] else "sbhd",
                         "cp4" if flags["cp"] else "cp1", "inter" if flags["interleaved"] else "half",
                         "rot75" if flags["partial"] else "rot100"))
        if full:
            out += [(f"{base}-{dt}", flags, dt, None) for dt in DTYPES]
        else:
            out.append((f"{base}-{DTYPES[i % len(DTYPES)]}", flags, DTYPES[i % len(DTYPES)], i))
    return out


# ----------------------------------------------------------------------------- worker (subprocess)
def _worker(arch: int, out_path: str) -> None:
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "the worker must compile, not interpret"
    import torch
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.language.extra import libdevice
    from triton.runtime.driver import driver

    from megatron_harpe.rope import fused_kernel as fk

    class TargetOnlyDriver:  # what JITFunction.run asks the driver for; nothing is launched (warmup)
        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return arch  # a per-arch key of the JIT's per-device caches

        def get_current_stream(self, device=None):
            return 0

    driver.set_active(TargetOnlyDriver())
    kernel, _ = fk._build_kernel()
    configs = list(kernel.configs)
    results = {"triton": triton.__version__, "configs": [str(c) for c in configs], "variants": []}

    def inspect(compiled):
        ptx = compiled.asm["ptx"]
        target = re.search(r"^\.target\s+(\S+)", ptx, re.M)
        return {"approx": sorted(set(APPROX.findall(ptx))), "target": target and target.group(1),
                "i2opi": "__cudart_i2opi_f" in ptx, "stages": list(compiled.asm),
                "cvt": {dt: bool(rx.search(ptx)) for dt, rx in CVT.items()}}

    t_all = time.time()
    for name, flags, dtype, sel in variants():
        dt = getattr(torch, dtype)
        hq, hk, d, s, b = 4, 2, 128, 256, 2
        half = 48 if flags["partial"] else 64  # rotary_percent 0.75: rot_dim 96, HALF_PAD 64, PASS 32
        cp_size, cp_rank = (4, 2) if flags["cp"] else (1, 0)
        if flags["thd"]:
            q, k = torch.randn(s, hq, d, dtype=dt), torch.randn(s, hk, d, dtype=dt)
            lengths = [40, 120, 96] if cp_size == 1 else [160, 384, 480]  # GLOBAL, each divisible by 2*cp
            cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)
        else:
            q, k = torch.randn(s, b, hq, d, dtype=dt), torch.randn(s, b, hk, d, dtype=dt)
            cu = None
        inv_freq = torch.rand(hk, half)
        fk._validate(q, k, inv_freq, cu, cp_size, cp_rank, 0, True)  # an input apply_harpe_rotary_qk accepts
        out_q, out_k = torch.empty_like(q), torch.empty_like(k)
        grid, args, constexprs = fk._launch_args(q, k, out_q, out_k, inv_freq, flags["interleaved"], cu,
                                                 cp_size, cp_rank, 0, flags["backward"])
        chosen = configs if sel is None else [configs[sel % len(configs)]]
        for config in chosen:
            rec = {"name": name, "config": str(config), "constexprs": constexprs}
            t0 = time.time()
            try:
                compiled = kernel.fn.warmup(*args, grid=grid, **constexprs, **config.all_kwargs())
                rec.update(inspect(compiled))
            except Exception as e:  # reported per variant by the test
                rec["error"] = f"{type(e).__name__}: {e}"[-3000:]
            rec["seconds"] = round(time.time() - t0, 2)
            results["variants"].append(rec)

    # negative control: the detector must see the fast path when it is there
    @triton.jit
    def _fast_sin_cos(x_ptr, o_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        x = tl.load(x_ptr + i)
        tl.store(o_ptr + i, libdevice.fast_sinf(x) + libdevice.fast_cosf(x))

    x = torch.randn(128)
    results["control"] = inspect(_fast_sin_cos.warmup(x, torch.empty_like(x), N=128, grid=(1,)))
    results["seconds"] = round(time.time() - t_all, 1)
    Path(out_path).write_text(json.dumps(results))


# ----------------------------------------------------------------------------- tests
triton = pytest.importorskip("triton")
try:
    from triton.backends.compiler import GPUTarget  # noqa: F401
    from triton.backends.nvidia import compiler as _nvidia  # noqa: F401
except ImportError:  # pragma: no cover - a triton without the CUDA backend
    pytest.skip("this triton has no CUDA backend to compile for", allow_module_level=True)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{arch: worker results}; the two arch workers run side by side."""
    tmp = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "triton-cache")  # fresh: every kernel is really compiled, $HOME untouched
    env.setdefault("OMP_NUM_THREADS", "1")
    procs = {}
    for arch in ARCHS:
        out = tmp / f"sm{arch}.json"
        code = f"from tests.test_fused_rope_compile import _worker; _worker({arch}, {str(out)!r})"
        procs[arch] = (out, subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = {}
    for arch, (out, proc) in procs.items():
        log, _ = proc.communicate(timeout=None if FULL else 840)
        assert proc.returncode == 0, f"sm_{arch} worker failed:\n{log[-4000:]}"
        results[arch] = json.loads(out.read_text())
    return results


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", [v[0] for v in variants()])
def test_variant_compiles_without_approximate_sin_cos(compiled, arch, name):
    recs = [r for r in compiled[arch]["variants"] if r["name"] == name]
    assert recs
    dtype = name.rsplit("-", 1)[1]
    for r in recs:
        assert "error" not in r, f"sm_{arch} {name} {r['config']}: {r['error']}"
        assert r["target"] == f"sm_{arch}a", r["target"]  # the explicit target was really used
        assert r["stages"][-2:] == ["ptx", "cubin"]  # the bundled ptxas assembled it too
        assert r["approx"] == [], f"sm_{arch} {name} {r['config']}: {r['approx']}"
        assert r["i2opi"], "no __cudart_i2opi_f table: libdevice's exactly reduced sinf/cosf not in the PTX"
        # the real GPU launch: precise cos/sin, hardware round-to-nearest-even stores
        assert r["constexprs"]["PRECISE"] is True and r["constexprs"]["SOFT_BF16"] is False
        if dtype in CVT:
            assert r["cvt"][dtype], f"no {CVT[dtype].pattern} in the {dtype} PTX"


@pytest.mark.parametrize("arch", ARCHS)
def test_negative_control_fast_sin_cos_is_detected(compiled, arch):
    control = compiled[arch]["control"]
    assert control["target"] == f"sm_{arch}a"
    assert any(a.startswith("sin.approx") for a in control["approx"]), control
    assert any(a.startswith("cos.approx") for a in control["approx"]), control


@pytest.mark.parametrize("arch", ARCHS)
def test_variants_cover_every_branch_dtype_and_autotune_config(compiled, arch):
    recs = compiled[arch]["variants"]
    names = {r["name"] for r in recs}
    assert names == {v[0] for v in variants()}
    combos = {n.rsplit("-", 1)[0] for n in names}
    assert len(combos) == 2 ** len(FLAGS)  # every BACKWARD x THD x CP x INTERLEAVED x PASS>0 branch
    for flag_index in range(len(FLAGS)):  # every dtype meets both values of every flag
        for dtype in DTYPES:
            seen = {n.split("-")[flag_index] for n in names if n.endswith(dtype)}
            assert len(seen) == 2, (FLAGS[flag_index], dtype, seen)
    configs = set(compiled[arch]["configs"])
    assert len(configs) > 1 and {r["config"] for r in recs} == configs  # the GPU autotune space, not the interpreter's
    for dtype in DTYPES:
        assert {r["config"] for r in recs if r["name"].endswith(dtype)} == configs
    constexprs = [r["constexprs"] for r in recs]
    assert {c["PASS"] > 0 for c in constexprs} == {True, False}
    assert any(c["HALF"] != c["HALF_PAD"] for c in constexprs)
