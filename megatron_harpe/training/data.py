"""Training batches: megatron-core GPTDataset (blends of indexed datasets) or a mock source.

Resumable by construction: the data position is one number, the samples consumed in the
current stage. Iteration i of a stage reads global samples [i*G, (i+1)*G) (G = global batch);
data-parallel rank d takes, for micro-batch j, samples j*(m*D) + d*m .. + m (m = micro batch,
D = data-parallel size). So a run resumed at any iteration, even with another DP size, reads
exactly the samples an uninterrupted run would have read.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch

from megatron_harpe.config.schema import DataConfig


class MockArithmeticDataset(torch.utils.data.Dataset):
    """Deterministic, learnable token sequences for smoke tests: sample i is an arithmetic
    progression modulo the vocabulary (start and step drawn from a generator seeded by i), so
    a model can drive the loss well below log(vocab) within a few dozen steps."""

    def __init__(self, vocab_size: int, seq_length: int, num_samples: int, seed: int):
        self.vocab_size, self.seq_length, self.num_samples, self.seed = vocab_size, seq_length, num_samples, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        gen = np.random.default_rng([self.seed, index])
        start, step = int(gen.integers(self.vocab_size)), int(gen.integers(1, 8))
        sequence = (start + step * np.arange(self.seq_length + 1)) % self.vocab_size
        tokens = torch.from_numpy(sequence[:-1].astype(np.int64))
        labels = torch.from_numpy(sequence[1:].astype(np.int64))
        return {"tokens": tokens, "labels": labels, "loss_mask": torch.ones(self.seq_length),
                "position_ids": torch.arange(self.seq_length)}


@dataclass
class TokenIds:
    """What megatron-core's GPTDataset reads from a tokenizer: vocabulary size and the EOD id."""

    vocab_size: int
    eod: int

    @property
    def unique_identifiers(self) -> dict:  # GPTDataset writes these into its index-cache description
        return {"class": "TokenIds", "vocab_size": self.vocab_size, "eod": self.eod}


def parse_blend(blend: List) -> tuple:
    """["a", "b"] or [w1, "a", w2, "b"] -> (prefixes, weights or None)."""
    if not blend:
        raise ValueError("data.blend is empty: list the .bin/.idx prefixes to train on "
                         "(e.g. [data/corpus_text_document]) or set data.kind=mock")
    if all(isinstance(x, str) for x in blend):
        return list(blend), None
    if len(blend) % 2 or not all(isinstance(w, (int, float)) and isinstance(p, str)
                                 for w, p in zip(blend[::2], blend[1::2])):
        raise ValueError(f"data.blend must be prefixes, or alternating weight, prefix; got {blend!r}")
    return [str(p) for p in blend[1::2]], [float(w) for w in blend[::2]]


def check_blend_files(blend: List) -> None:
    prefixes, _ = parse_blend(blend)
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not Path(prefix + suffix).is_file():
                raise FileNotFoundError(f"data.blend: {prefix}{suffix} does not exist; make it with "
                                        f"harpe-preprocess --output-prefix ... (prefixes omit .bin/.idx)")


def build_train_dataset(data: DataConfig, *, vocab_size: int, seq_length: int, num_samples: int, seed: int,
                        eod_id: Optional[int], cache_dir: str):
    """The training split, with at least `num_samples` samples of `seq_length` tokens."""
    if data.kind == "mock":
        return MockArithmeticDataset(vocab_size, seq_length, num_samples, seed)
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from megatron_harpe.data.helpers import ensure_helpers

    ensure_helpers()  # megatron-core's C++ sample-index helpers (prebuilt in wheels; built once otherwise)

    if (data.eod_mask_loss or data.reset_position_ids) and eod_id is None:
        raise ValueError("data.eod_mask_loss / data.reset_position_ids need the EOD id: set data.tokenizer_model")
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=parse_blend(data.blend),
        split=data.split,
        path_to_cache=cache_dir,
        tokenizer=TokenIds(vocab_size=vocab_size, eod=eod_id if eod_id is not None else 0),
        reset_position_ids=data.reset_position_ids,
        reset_attention_mask=False,
        eod_mask_loss=data.eod_mask_loss,
        create_attention_mask=False,
    )
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, None, None], lambda: True, config).build()
    if train is None or len(train) < num_samples:
        raise ValueError(f"the training split of {data.blend} yields {0 if train is None else len(train)} samples of "
                         f"{seq_length} tokens, fewer than the {num_samples} the run needs; add data or check data.split")
    return train


class MicroBatches:
    """This DP rank's micro-batches of one iteration, from a position in the stage."""

    def __init__(self, dataset, *, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int):
        if global_batch % (micro_batch * dp_size):
            raise ValueError(f"data.global_batch_size ({global_batch}) must be divisible by micro_batch_size "
                             f"({micro_batch}) x data-parallel size ({dp_size})")
        self.dataset, self.global_batch, self.micro_batch = dataset, global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_microbatches = global_batch // (micro_batch * dp_size)

    def iteration(self, iteration_in_stage: int) -> List[Dict[str, torch.Tensor]]:
        first = iteration_in_stage * self.global_batch
        batches = []
        for j in range(self.num_microbatches):
            start = first + j * self.micro_batch * self.dp_size + self.dp_rank * self.micro_batch
            samples = [self.dataset[start + k] for k in range(self.micro_batch)]
            batches.append({key: torch.stack([torch.as_tensor(np.asarray(s[key])) for s in samples])
                            for key in ("tokens", "labels", "loss_mask", "position_ids")})
        return batches


def iterators_for_chunks(batches: List[Dict[str, torch.Tensor]], num_chunks: int) -> List[Iterator] | Iterator:
    """One iterator per virtual-pipeline chunk over the same micro-batches (megatron-core's contract)."""
    if num_chunks == 1:
        return iter(batches)
    return [iter(batches) for _ in range(num_chunks)]
