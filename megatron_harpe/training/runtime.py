"""What this machine can run, and the config checks that depend on it.

config/validate.py judges everything the config alone decides, without importing torch. What
depends on the machine (a GPU and its generation, Transformer Engine, Triton) is checked here, on
every rank, after the backend is chosen and before any process group exists, so an FP8 run
submitted to a node without TE fails in seconds with the same message on every rank instead of
deep inside megatron-core.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from megatron_harpe.config.combinations import Platform, config_refusals
from megatron_harpe.config.loader import ConfigError
from megatron_harpe.config.validate import raise_refusals
from megatron_harpe.config.schema import Config
from megatron_harpe.models.spec import transformer_engine_available
from megatron_harpe.models.transformer_config import apex_wgrad_fusion_available, rope_kernel


@dataclass(frozen=True)
class Machine:
    cuda: bool
    te: bool
    triton: bool
    capability: Optional[Tuple[int, int]]  # compute capability of the current GPU, None without CUDA
    triton_interpreted: bool = False  # TRITON_INTERPRET=1: kernels run in Triton's (slow) interpreter
    apex_wgrad: bool = False  # apex's fused_weight_gradient_mlp_cuda: needed for gradient_accumulation_fusion
    te_version: Optional[str] = None  # Transformer Engine's release when `te`

    def platform(self) -> Platform:
        """What config/combinations.py's rules may know about this machine."""
        return Platform(te_version=self.te_version if self.te else None, capability=self.capability, te=self.te)

    def peak_tflops(self, fp8: bool) -> Optional[float]:
        """Dense peak TFLOP/s per device, the MFU denominator: H100/H200 SXM (bf16 989, FP8 1979);
        None on CPU, where MFU means nothing."""
        if not self.cuda:
            return None
        return 1979.0 if fp8 else 989.0


def detect_machine() -> Machine:
    cuda = torch.cuda.is_available()
    from megatron_harpe.rope.fused_kernel import fused_rope_available

    return Machine(cuda=cuda, te=cuda and transformer_engine_available(), triton=fused_rope_available(),
                   capability=torch.cuda.get_device_capability() if cuda else None,
                   triton_interpreted=os.environ.get("TRITON_INTERPRET") == "1",
                   apex_wgrad=cuda and apex_wgrad_fusion_available(), te_version=_te_version())


def _te_version() -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    for name in ("transformer-engine", "transformer_engine", "transformer-engine-torch"):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    try:  # an NGC container's source build may carry no metadata under those names
        import transformer_engine

        return getattr(transformer_engine, "__version__", None)
    except Exception:
        return None


def check_runtime(cfg: Config, machine: Machine) -> None:
    """Raise ConfigError naming the key when the config asks for something this machine lacks."""
    f = cfg.fp8
    if f.format is not None:
        if not (machine.cuda and machine.te):
            raise ConfigError("fp8.format needs Transformer Engine on a GPU (pip install 'megatron-harpe[gpu]' in "
                              "an NGC PyTorch container, see requirements/gpu.md); this machine has "
                              f"{'no GPU' if not machine.cuda else 'no Transformer Engine'}")
        if machine.capability < (8, 9):
            raise ConfigError(f"fp8.format needs an FP8 GPU (Ada/Hopper or newer, compute capability >= 8.9); "
                              f"this one is {machine.capability}")
        if f.recipe == "mxfp8" and machine.capability < (10, 0):
            raise ConfigError(f"fp8.recipe=mxfp8 needs a Blackwell GPU (compute capability >= 10.0); this one is "
                              f"{machine.capability}; use delayed or tensorwise")
    try:
        rope_kernel(cfg.model, cuda=machine.cuda, te=machine.te, triton=machine.triton,
                    interpreted=machine.triton_interpreted)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    # the combinations TE (by version) and this GPU (by capability) cannot run; config validation already
    # applied the rules that hold everywhere
    raise_refusals(config_refusals(cfg, machine.platform()))
    if machine.triton_interpreted and machine.cuda:
        raise ConfigError("TRITON_INTERPRET=1 is set on a GPU machine: Triton kernels would run in the (slow) "
                          "interpreter; unset it")
    if cfg.logging.profile.enabled and cfg.logging.profile.memory_snapshot and not machine.cuda:
        # refused, not warned: the user asked for a file that this run could never write
        raise ConfigError("logging.profile.memory_snapshot records the CUDA caching allocator's history and needs a "
                          "GPU; this machine has none: set logging.profile.memory_snapshot=false")
