"""megatron-harpe: single-stage long-context continual pretraining on megatron-core.

torch is deliberately left as a range here: GPU clusters bring their own CUDA build.
CPU machines (laptops, CI) install the pinned CPU build first from requirements/cpu.txt,
which is what the README's commands and `.ci/run` do.
"""
from setuptools import find_packages, setup

setup(
    name="megatron-harpe",
    version="0.1.0",
    description="HARPE (head-adaptive RoPE) single-stage long-context training on megatron-core",
    packages=find_packages(include=["megatron_harpe", "megatron_harpe.*"]),
    python_requires=">=3.10,<3.12",
    install_requires=[
        "torch>=2.6",
        "megatron-core==0.16.1",
        "numpy",
        "packaging",
        "PyYAML",
        "tqdm",
        "matplotlib",
        "psutil",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]"],
        "mpi": ["mpi4py"],
        "hf": ["transformers>=4.45", "safetensors"],
        "dev": ["pytest>=8", "pytest-timeout"],
    },
    entry_points={
        "console_scripts": [
            "harpe-bases=megatron_harpe.rope.bases_cli:main",
        ]
    },
)
