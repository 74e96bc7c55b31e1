"""The accelerators the planner knows: memory, dense peak FLOP/s, and the links between them.

Every number is a datasheet figure (or what ``nvidia-smi`` reports as total memory), not a
measurement; `docs/planning.md` lists them with their sources. What a run actually reaches is a
fraction of these, set by the planner's efficiency assumptions (see :class:`Assumptions`), never
hidden in these figures.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Optional

GIB = 1024 ** 3


@dataclass(frozen=True)
class GPU:
    """One accelerator type.

    memory_gib: total device memory as the driver reports it (nvidia-smi "Total", in GiB).
    bf16_tflops / fp8_tflops: dense (no sparsity) peak of the tensor cores; fp8 None = no FP8.
    hbm_tb_s: memory bandwidth (the optimizer step is memory-bound).
    nvlink_gb_s: NVLink bandwidth per GPU per direction (what a ring collective inside a node uses).
    network_gb_s: inter-node bandwidth per GPU (one NIC per GPU, e.g. 400 Gb/s NDR = 50 GB/s).
    gpus_per_node: GPUs joined by NVLink (tensor parallelism stays inside it).
    """

    name: str
    memory_gib: float
    bf16_tflops: float
    fp8_tflops: Optional[float]
    hbm_tb_s: float
    nvlink_gb_s: float
    network_gb_s: float
    gpus_per_node: int = 8

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    def peak_tflops(self, fp8: bool) -> float:
        return self.fp8_tflops if fp8 and self.fp8_tflops else self.bf16_tflops


#: H100/H200 SXM5 (HGX/DGX, NVLink 4: 900 GB/s bidirectional = 450 per direction, one 400 Gb/s NDR
#: NIC per GPU); A100 SXM4 80GB (NVLink 3: 600 GB/s bidirectional, one 200 Gb/s HDR NIC per GPU).
GPUS: Dict[str, GPU] = {
    "h100": GPU("H100 80GB", memory_gib=79.6, bf16_tflops=989.0, fp8_tflops=1979.0, hbm_tb_s=3.35,
                nvlink_gb_s=450.0, network_gb_s=50.0),
    "h200": GPU("H200 141GB", memory_gib=140.4, bf16_tflops=989.0, fp8_tflops=1979.0, hbm_tb_s=4.8,
                nvlink_gb_s=450.0, network_gb_s=50.0),
    "a100": GPU("A100 80GB", memory_gib=80.0, bf16_tflops=312.0, fp8_tflops=None, hbm_tb_s=2.0,
                nvlink_gb_s=300.0, network_gb_s=25.0),
}

ALIASES = {"h100-80gb": "h100", "h100_80gb": "h100", "h200-141gb": "h200", "a100-80gb": "a100"}


def gpu_named(name: str, memory_gib: Optional[float] = None) -> GPU:
    """The GPU called `name` (h100, h200, a100), with its memory replaced by `memory_gib` if given."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; choose one of {', '.join(GPUS)} (and --gpu-memory GIB for "
                         f"another memory size)")
    gpu = GPUS[key]
    if memory_gib is not None:
        if not memory_gib > 0:
            raise ValueError(f"--gpu-memory must be > 0 GiB, got {memory_gib}")
        gpu = replace(gpu, name=f"{gpu.name} (memory set to {memory_gib:g} GiB)", memory_gib=float(memory_gib))
    return gpu


@dataclass(frozen=True)
class Assumptions:
    """What the time and memory predictions assume; every field is printed with the prediction.

    efficiency: fraction of the dense peak that the compute kernels reach (matmuls and attention
        together; 0.40 is a typical bf16 figure for a 7B dense model on H100 with Megatron). The
        predicted MFU comes out below it: communication, the pipeline bubble and recomputation are
        added on top.
    link_efficiency: fraction of a link's bandwidth a ring collective reaches (bus bandwidth).
    fragmentation: allowance for the caching allocator's fragmentation, as a fraction of the
        activation and transient bytes (the parts that are allocated and freed every step).
    reserve_gib: allowance for what torch's allocator does not see or what is not modelled: CUDA
        context, NCCL buffers, cuBLAS/Transformer Engine workspaces.
    """

    efficiency: float = 0.40
    link_efficiency: float = 0.70
    fragmentation: float = 0.10
    reserve_gib: float = 3.0

    def check(self) -> "Assumptions":
        for name in ("efficiency", "link_efficiency"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be in (0, 1], got {value}")
        if not 0.0 <= self.fragmentation < 1.0:
            raise ValueError(f"--fragmentation must be in [0, 1), got {self.fragmentation}")
        if self.reserve_gib < 0:
            raise ValueError(f"--reserve-gib must be >= 0, got {self.reserve_gib}")
        return self
