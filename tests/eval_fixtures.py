"""Evaluation fixtures: a Hugging Face tokenizer directory and tiny local Llama models (no downloads).

Import into a test module with ``from tests.eval_fixtures import *``. Session-scoped and
memoised like tests/data_fixtures.py:

- ``eval_tokenizer_dir``: the test corpus's sentencepiece model (data_fixtures) as a HF tokenizer
  directory (tokenizer.model + tokenizer.json + tokenizer_config.json, via the exporter's
  ``sentencepiece_to_hf``), loadable with ``AutoTokenizer``;
- ``tiny_model_dir``: an untrained stock ``LlamaForCausalLM`` (2 layers, hidden 64, GQA 4/2)
  with that tokenizer, saved with ``save_pretrained``;
- ``passkey_model_dir``: the same size (MHA) trained with plain PyTorch for 300 steps on the
  demo corpus's passkey documents with 0-3 filler sentences (105-125 tokens; ~15 s on one
  core). It retrieves passkeys in prompts as long as its training documents (~100% at 128
  tokens over seeds tried) and fails more and more beyond them (about 0-20% at 230 tokens),
  which gives the heatmaps their structure.
"""
from __future__ import annotations

import functools
import os
import random
from pathlib import Path

import pytest

from tests.data_fixtures import _spm, data_dir  # noqa: F401  (data_dir is a fixture used below)

__all__ = ["eval_tokenizer_dir", "tiny_model_dir", "passkey_model_dir", "make_eval_tokenizer_dir",
           "make_tiny_model", "make_passkey_model", "data_dir"]

TRAIN_STEPS = 300
TRAIN_BATCH = 16
TRAIN_MAX_SENTENCES = 3
TRAIN_LR = 5e-3


@functools.lru_cache(maxsize=None)
def make_eval_tokenizer_dir(base: str) -> str:
    from megatron_harpe.convert.tokenizer_files import sentencepiece_to_hf

    out = Path(base) / "eval-tokenizer"
    if not (out / "tokenizer_config.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        sentencepiece_to_hf(Path(_spm(base)), out, 1 << 20)
    return str(out)


def _config(tokenizer, kv_heads: int = 2, max_positions: int = 4096):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                       rope_theta=10000.0, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       tie_word_embeddings=False)


def _save(model, tokenizer_dir: str, out: Path) -> None:
    import shutil

    model.save_pretrained(str(out))
    for name in os.listdir(tokenizer_dir):
        shutil.copy2(os.path.join(tokenizer_dir, name), out / name)


@functools.lru_cache(maxsize=None)
def make_tiny_model(base: str, seed: int = 0) -> str:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = Path(base) / f"tiny-llama-{seed}"
    if (out / "config.json").is_file():
        return str(out)
    tok_dir = make_eval_tokenizer_dir(base)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_config(tok)).eval()
    _save(model, tok_dir, out)
    return str(out)


@functools.lru_cache(maxsize=None)
def make_passkey_model(base: str, steps: int = TRAIN_STEPS) -> str:
    """A tiny Llama trained on passkey documents: loss on every token plus the answer's tokens again."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer, LlamaForCausalLM

    from megatron_harpe.data.corpus import passkey_document

    out = Path(base) / f"passkey-llama-{steps}"
    if (out / "config.json").is_file():
        return str(out)
    tok_dir = make_eval_tokenizer_dir(base)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(tok, kv_heads=4))
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN_LR, weight_decay=0.0, betas=(0.9, 0.98))
    rng = random.Random(0)
    model.train()
    for step in range(steps):
        seqs, answer_lens = [], []
        for _ in range(TRAIN_BATCH):
            text, key = passkey_document(rng, rng.randint(0, TRAIN_MAX_SENTENCES))
            seqs.append(tok(text).input_ids)
            answer_lens.append(len(tok(f" {key}.", add_special_tokens=False).input_ids))
        width = max(map(len, seqs))
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        answer = torch.zeros((len(seqs), width))
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            labels[i, :len(s)] = torch.tensor(s)
            answer[i, len(s) - answer_lens[i] + 1:len(s) - 1] = 1.0   # the key's digits (not " " or the final ".")
        for group in opt.param_groups:
            group["lr"] = TRAIN_LR * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * (1 - step / steps))
        logits = model(ids).logits[:, :-1]
        target = labels[:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                             reduction="none").view(target.shape)
        mask = (target != -100).float()
        weight = answer[:, 1:]
        loss = 0.2 * (ce * mask).sum() / mask.sum() + (ce * weight).sum() / weight.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    _save(model, tok_dir, out)
    return str(out)


@pytest.fixture(scope="session")
def eval_tokenizer_dir(data_dir) -> str:  # noqa: F811
    return make_eval_tokenizer_dir(str(data_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(data_dir) -> str:  # noqa: F811
    return make_tiny_model(str(data_dir))


@pytest.fixture(scope="session")
def passkey_model_dir(data_dir) -> str:  # noqa: F811
    return make_passkey_model(str(data_dir))
