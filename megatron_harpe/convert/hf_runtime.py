"""Loading and running exported models with transformers (verification, the demo's generation)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from megatron_harpe.convert.errors import ConversionError


@contextlib.contextmanager
def hf_progress(enabled: bool):
    """transformers' own progress bars (e.g. "Loading weights") on or off for a block, as a command's
    --no-progress asks; restored after."""
    if enabled:
        yield
        return
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def load_hf_causal_lm(directory: str | Path, dtype: torch.dtype = torch.float32, show_progress: bool = True):
    """AutoModelForCausalLM from a local directory (HARPE exports need trust_remote_code), in eval mode."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ConversionError("loading Hugging Face models needs transformers: pip install 'megatron-harpe[hf]'") \
            from None
    with hf_progress(show_progress):
        try:  # transformers >= 4.56 calls it dtype; older versions torch_dtype
            model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, trust_remote_code=True,
                                                         local_files_only=True)
        except TypeError:
            model = AutoModelForCausalLM.from_pretrained(str(directory), torch_dtype=dtype, trust_remote_code=True,
                                                         local_files_only=True)
    return model.eval()


def hf_greedy(model, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy continuation with transformers' generate (KV cache); returns prompt + new ids (it stops early
    at the end-of-sequence token)."""
    with torch.no_grad():
        return model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                              do_sample=False, num_beams=1,
                              pad_token_id=model.config.eos_token_id if model.config.pad_token_id is None
                              else model.config.pad_token_id)
