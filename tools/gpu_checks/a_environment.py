"""Section a, the environment: what the machine is (GPU, memory, compute capability, driver, CUDA, torch,
triton, megatron-core and whether this project supports it, Transformer Engine, cuDNN), and whether SDPA's
flash backend runs bf16 causal attention at head dim 128."""
from __future__ import annotations

import os
import platform
import subprocess
from typing import Any, Dict

from .common import Env, Section, gib


def run(sec: Section, env: Env) -> None:
    import torch

    v: Dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                         "torch_cuda": torch.version.cuda}
    for name, mod in (("triton", "triton"), ("numpy", "numpy")):
        try:
            v[name] = __import__(mod).__version__
        except Exception as err:  # noqa: BLE001
            v[name] = f"absent ({type(err).__name__})"
    from megatron_harpe import compat

    try:  # the package metadata (from 0.19 megatron.core.__version__ carries a git hash: compat.installed_version)
        v["megatron_core"] = compat.installed_version()
    except Exception:  # noqa: BLE001
        import megatron.core

        v["megatron_core"] = getattr(megatron.core, "__version__", "unknown")
    from megatron_harpe.models.spec import transformer_engine_available

    env.te = env.cuda and transformer_engine_available()
    if env.te:
        import transformer_engine

        v["transformer_engine"] = getattr(transformer_engine, "__version__", "present")
    else:
        v["transformer_engine"] = "absent" if env.cuda else "not used on CPU"
    v["cudnn"] = torch.backends.cudnn.version() if env.cuda else None
    sec.number("versions", v)
    sec.log("versions: " + ", ".join(f"{k} {val}" for k, val in v.items()))

    supported = compat.supported()
    unverified = compat.unverified_workarounds()
    sec.number("megatron_core", {"installed": v["megatron_core"], "supported": supported,
                                 "supported_releases": compat.SUPPORTED_RELEASES,
                                 "tested_releases": list(compat.TESTED_RELEASES),
                                 "unverified_workarounds": [w.name for w in unverified]})
    sec.check("megatron-core release is in the range this project supports", supported,
              value=f"{v['megatron_core']} (supported {compat.SUPPORTED_RELEASES}; tested "
                    f"{', '.join(compat.TESTED_RELEASES)})")
    sec.check("megatron-core release is the one compat.py's workarounds were verified on", not unverified,
              value=v["megatron_core"], detail=f"unverified workarounds: {[w.name for w in unverified]}")
    from megatron_harpe.rope.fused_kernel import fused_rope_available

    sec.check("fused RoPE kernel can run here (triton + CUDA, or the interpreter)", fused_rope_available(),
              value=f"triton {v['triton']}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}")

    if not env.cuda:
        sec.number("gpu", None)
        sec.skip("GPU name, memory, compute capability, driver", "CPU mode: no CUDA device")
        sec.skip("SDPA flash backend probe (bf16, causal, head dim 128)", "CPU mode: flash is a CUDA backend")
        return
    props = torch.cuda.get_device_properties(env.device)
    gpu = {"name": props.name, "memory_bytes": int(props.total_memory),
           "memory": gib(props.total_memory), "compute_capability": f"{props.major}.{props.minor}",
           "multiprocessors": props.multi_processor_count, "device_count": torch.cuda.device_count()}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        gpu["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    except Exception as err:  # noqa: BLE001
        gpu["driver"] = f"nvidia-smi failed: {type(err).__name__}"
    try:
        gpu["cuda_driver_api"] = torch._C._cuda_getDriverVersion()
    except Exception:  # noqa: BLE001
        pass
    sec.number("gpu", gpu)
    sec.log(f"GPU: {gpu}")
    sec.check("CUDA device present", True, value=f"{props.name}, {gpu['memory']}, sm_{props.major}{props.minor}")

    # Does SDPA's flash backend run the model's shape: bf16, causal, head dim 128 (MHA and GQA)?
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for label, hk in (("MHA 32 heads", 32), ("GQA 32q/8kv", 8)):
        q = torch.randn(1, 32, 1024, 128, device=env.device, dtype=torch.bfloat16)
        k = torch.randn(1, hk, 1024, 128, device=env.device, dtype=torch.bfloat16)
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=hk != 32)
            torch.cuda.synchronize()
            ok, why = True, "runs"
        except Exception as err:  # noqa: BLE001
            ok, why = False, f"refused: {str(err).splitlines()[0][:300]}"
        sec.number(f"sdpa_flash_{'mha' if hk == 32 else 'gqa'}", why)
        sec.target(f"SDPA flash backend for bf16 causal, head dim 128, {label}", ok, why, "available")

