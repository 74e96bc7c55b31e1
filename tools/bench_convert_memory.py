#!/usr/bin/env python
"""Peak memory of harpe-convert, both directions, beside a process that only imports, in one run.

    python tools/bench_convert_memory.py [--hf-dir DIR] [--max-shard-size 5GB] [--work DIR]

Default model: the SmolLM2-135M fixture (`harpe-fixture smollm2`) when it can be had, else a
random Llama made here with transformers (24 layers, hidden 256: ~100 MB fp32). Three fresh
processes (megatron_harpe/convert/memory_probe.py): one imports the converters and sets up their
one-process world, one runs hf-to-megatron on the model, one runs megatron-to-hf on that result.
Printed: each one's peak RSS, what the conversion adds over the imports-only process, and the
sizes that bound it (the weights, one transformer layer, the embedding / output layer), then a
one-line summary. docs/convert.md ("Memory") has the figures and what they mean for 7B and 70B.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_harpe.convert.memory_probe import probe  # noqa: E402


def default_model(work: Path) -> tuple[Path, str]:
    """The SmolLM2 fixture if it is there (or can be built), else a random Llama written into `work`."""
    from megatron_harpe.convert.fixtures import FixtureUnavailable, ensure_fixture

    try:
        return ensure_fixture("smollm2", show_progress=False).directory, "smollm2-135m (fixture)"
    except FixtureUnavailable as err:
        print(f"(SmolLM2 fixture unavailable: {str(err).splitlines()[0]}; using a random Llama)", file=sys.stderr)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=24,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    directory = work / "random-llama"
    LlamaForCausalLM(config).save_pretrained(directory, max_shard_size="50MB")
    return directory, "random Llama (24 layers, hidden 256)"


def model_sizes(hf_dir: Path) -> dict:
    """Bytes of all weights, of transformer layer 0, of the embedding and of lm_head (from the headers)."""
    import torch

    from megatron_harpe.convert.hf_checkpoint import HFCheckpoint

    reader = HFCheckpoint(hf_dir)

    def nbytes(name):
        shape = reader.shape(name)
        return torch.Size(shape).numel() * torch.empty((), dtype=reader.tensor_dtype(name)).element_size()

    sizes = {name: nbytes(name) for name in reader.names()}
    reader.close()
    return {"weights": sum(sizes.values()),
            "layer": sum(v for k, v in sizes.items() if k.startswith("model.layers.0.")),
            "embedding": sizes.get("model.embed_tokens.weight", 0), "lm_head": sizes.get("lm_head.weight", 0),
            "layers": len({k.split(".")[2] for k in sizes if k.startswith("model.layers.")})}


def mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hf-dir", help="HF Llama directory (default: the SmolLM2 fixture, else a random Llama)")
    parser.add_argument("--max-shard-size", default="5GB", help="megatron-to-hf's --max-shard-size (default 5GB)")
    parser.add_argument("--work", help="directory for the outputs (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-convert-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.hf_dir:
            hf_dir, label = Path(args.hf_dir), Path(args.hf_dir).name
        else:
            hf_dir, label = default_model(work)
        sizes = model_sizes(hf_dir)
        imports = probe(["imports"], hf_dir, work).phases["imports"]
        to_megatron = probe(["hf-to-megatron"], hf_dir, work).phases["hf-to-megatron"]
        to_hf = probe(["megatron-to-hf"], work / "megatron", work,
                      max_shard_size=args.max_shard_size).phases["megatron-to-hf"]
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"model: {label}: {sizes['layers']} layers, {mb(sizes['weights'])} of weights; one layer "
          f"{mb(sizes['layer'])}, embedding {mb(sizes['embedding'])}"
          + (f", lm_head {mb(sizes['lm_head'])}" if sizes["lm_head"] else " (tied)")
          + f"; --max-shard-size {args.max_shard_size}")
    print(f"{'process':<18}{'peak RSS':>12}{'above imports':>16}{'seconds':>10}")
    print(f"{'imports only':<18}{mb(imports.peak):>12}{'-':>16}{imports.seconds:>10.1f}")
    for name, phase in (("hf-to-megatron", to_megatron), ("megatron-to-hf", to_hf)):
        print(f"{name:<18}{mb(phase.peak):>12}{mb(phase.peak - imports.peak):>16}{phase.seconds:>10.1f}")
    print(f"bench_convert_memory: {label} ({mb(sizes['weights'])} of weights): hf-to-megatron "
          f"+{mb(to_megatron.peak - imports.peak)}, megatron-to-hf +{mb(to_hf.peak - imports.peak)} over the "
          f"{mb(imports.peak)} of an imports-only process (one layer {mb(sizes['layer'])}, embedding "
          f"{mb(sizes['embedding'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
