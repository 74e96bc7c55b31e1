"""Files shipped into exported Hugging Face directories of HARPE models.

``configuration_harpe_llama.py`` and ``modeling_harpe_llama.py`` are copied next to the
weights by ``harpe-convert megatron-to-hf``; ``config.json``'s ``auto_map`` points at them,
so ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` loads the model with
its per-K/V-group RoPE bases. They import only torch and transformers (never this project),
because they run wherever the exported model goes.
"""
from pathlib import Path

HF_MODELING_DIR = Path(__file__).resolve().parent
HF_MODELING_FILES = ("configuration_harpe_llama.py", "modeling_harpe_llama.py")
