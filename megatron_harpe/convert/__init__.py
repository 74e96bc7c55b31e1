"""Checkpoint conversion: Hugging Face Llama <-> megatron-core, HARPE models exported to Hugging Face.

    from megatron_harpe.convert import convert_hf_to_megatron, convert_megatron_to_hf, export_and_generate

- `convert_hf_to_megatron(hf_dir, save, tp=, pp=, position=...)`: a torch_dist checkpoint that
  `training.init_from` loads into any TP/PP layout (hf_to_megatron.py);
- `convert_megatron_to_hf(load, out, tokenizer=...)`: safetensors + config.json (stock Llama, or
  HARPE Llama with its modeling files and auto_map) + generation config + tokenizer
  (megatron_to_hf.py);
- `export_and_generate(run_dir, tokenizer, prompt)`: the demo's last step (generate.py).

The command line is `harpe-convert` (cli.py); docs/convert.md has the details. Imports are lazy:
importing this package (or hf_modeling/, which ships into exported directories) loads neither
megatron-core nor transformers.
"""
from __future__ import annotations

__all__ = ["convert_hf_to_megatron", "convert_megatron_to_hf", "export_and_generate", "ConversionError"]


def __getattr__(name):
    if name == "convert_hf_to_megatron":
        from megatron_harpe.convert.hf_to_megatron import convert_hf_to_megatron
        return convert_hf_to_megatron
    if name == "convert_megatron_to_hf":
        from megatron_harpe.convert.megatron_to_hf import convert_megatron_to_hf
        return convert_megatron_to_hf
    if name == "export_and_generate":
        from megatron_harpe.convert.generate import export_and_generate
        return export_and_generate
    if name == "ConversionError":
        from megatron_harpe.convert.errors import ConversionError
        return ConversionError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
