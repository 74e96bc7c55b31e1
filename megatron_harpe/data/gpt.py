"""megatron-core GPTDatasets from our indexed datasets, for the trainer.

    from megatron_harpe.data.gpt import build_gpt_datasets
    train, valid, test = build_gpt_datasets(["out/slimpj_128k"], tokenizer, seq_length=131072,
                                            num_samples=(1000, 10, 0), split="99,1,0")

A thin layer over ``BlendedMegatronDatasetBuilder(GPTDataset, ...)``: it makes sure the C++
helpers exist (:func:`megatron_harpe.data.helpers.ensure_helpers`), accepts Megatron-LM's
``--data-path`` list form (``prefix`` or ``weight prefix weight prefix ...``), and passes our
tokenizer (which has what GPTDataset reads: ``eod``, ``vocab_size``, ``pad``). Under
torch.distributed, megatron-core builds the index caches on rank 0 first.
"""
from __future__ import annotations

from typing import Sequence

__all__ = ["build_gpt_datasets", "gpt_dataset_config"]


def gpt_dataset_config(data_path: Sequence[str] | str, tokenizer, seq_length: int, *, split: str = "100,0,0",
                       seed: int = 1234, cache_dir: str | None = None, reset_position_ids: bool = False,
                       reset_attention_mask: bool = False, eod_mask_loss: bool = False,
                       create_attention_mask: bool = False, **kwargs):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.core.datasets.utils import get_blend_from_list

    paths = [data_path] if isinstance(data_path, str) else list(data_path)
    return GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=get_blend_from_list(paths), split=split,
        path_to_cache=cache_dir, tokenizer=tokenizer, reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask, eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask, **kwargs)


def build_gpt_datasets(data_path: Sequence[str] | str, tokenizer, seq_length: int,
                       num_samples: Sequence[int | None] = (None, None, None), **config_kwargs):
    """(train, valid, test) GPTDatasets (None where a split is empty). ``num_samples`` per split:
    None = one epoch of that split."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset

    from megatron_harpe.data.helpers import ensure_helpers

    ensure_helpers()
    config = gpt_dataset_config(data_path, tokenizer, seq_length, **config_kwargs)
    builder = BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, config)
    return builder.build()
