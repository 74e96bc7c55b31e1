"""megatron-core GPTDatasets from indexed datasets: the one builder the trainer (and anyone) uses.

    train, valid, test = build_gpt_datasets(["out/slimpj_128k_text_document"], seq_length=131072,
                                            num_samples=(1000, 10, None), split="99,1,0",
                                            eod_id=tok.eod_id, vocab_size=tok.vocab_size)

A thin layer over ``BlendedMegatronDatasetBuilder(GPTDataset, ...)``: it makes sure megatron-core's
C++ sample-index helpers exist (:func:`megatron_harpe.data.helpers.ensure_helpers`), takes the blend
in the config's form (prefixes, or alternating weight, prefix), and hands GPTDataset the two things
it reads from a tokenizer (vocabulary size and EOD id) without needing the tokenizer itself. Under
torch.distributed, megatron-core builds the index caches on rank 0 first.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

from megatron_harpe.config.schema import parse_blend
from megatron_harpe.data.indexed import check_indexed_dataset
from megatron_harpe.data.inputs import DataError


class TokenIds:
    """What megatron-core's GPTDataset reads from a tokenizer: vocabulary size and the EOD id."""

    def __init__(self, vocab_size: int, eod: int):
        self.vocab_size, self.eod = vocab_size, eod

    @property
    def unique_identifiers(self) -> dict:  # GPTDataset writes these into its index-cache description
        return {"class": "TokenIds", "vocab_size": self.vocab_size, "eod": self.eod}


def build_gpt_datasets(blend: List, *, seq_length: int, num_samples: Sequence[Optional[int]] = (None, None, None),
                       split: str = "100,0,0", seed: int = 1234, cache_dir: Optional[str] = None,
                       vocab_size: int, eod_id: Optional[int] = None, reset_position_ids: bool = False,
                       eod_mask_loss: bool = False):
    """(train, valid, test) GPTDatasets (None where a split is empty). ``num_samples`` per split:
    None = one epoch of that split."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from megatron_harpe.data.helpers import ensure_helpers

    if (eod_mask_loss or reset_position_ids) and eod_id is None:
        raise DataError("data.eod_mask_loss / data.reset_position_ids need the EOD id: set data.tokenizer_model")
    prefixes, _ = parse_blend(blend)
    for prefix in prefixes:  # a truncated or mismatched pair fails here, named, not deep in GPTDataset
        check_indexed_dataset(prefix)
    ensure_helpers()
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=parse_blend(blend), split=split,
        path_to_cache=cache_dir, tokenizer=TokenIds(vocab_size=vocab_size, eod=eod_id if eod_id is not None else 0),
        reset_position_ids=reset_position_ids, reset_attention_mask=False, eod_mask_loss=eod_mask_loss,
        create_attention_mask=False)
    return BlendedMegatronDatasetBuilder(GPTDataset, list(num_samples), lambda: True, config).build()
