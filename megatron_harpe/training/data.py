"""Training batches: megatron-core GPTDataset (blends of indexed datasets) or a mock source.

Resumable by construction: the data position is one number, the samples consumed in the
current stage. Iteration i of a stage reads global samples [i*G, (i+1)*G) (G = global batch);
data-parallel rank d takes, for micro-batch j, samples j*(m*D) + d*m .. + m (m = micro batch,
D = data-parallel size). So a run resumed at any iteration, even with another DP size, reads
exactly the samples an uninterrupted run would have read.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional

import numpy as np
import torch

from megatron_harpe.config.schema import DataConfig
from megatron_harpe.data.gpt_dataset import build_gpt_datasets
from megatron_harpe.data.inputs import DataError


VALID_SEED_OFFSET = 1_000_003  # mock validation samples: another seed, so never a training sample


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


def build_datasets(data: DataConfig, *, vocab_size: int, seq_length: int, num_samples: int, valid_samples: int,
                   seed: int, eod_id: Optional[int], cache_dir: str):
    """(train, valid): the training split with at least `num_samples` samples of `seq_length` tokens,
    and the validation split with `valid_samples` (None when 0). Mock data validates on a stream of
    its own (another seed), never on training samples."""
    if data.kind == "mock":
        valid = MockArithmeticDataset(vocab_size, seq_length, valid_samples, seed + VALID_SEED_OFFSET)
        return MockArithmeticDataset(vocab_size, seq_length, num_samples, seed), valid if valid_samples else None
    train, valid, _ = build_gpt_datasets(data.blend, seq_length=seq_length,
                                         num_samples=(num_samples, valid_samples or None, None),
                                         split=data.split, seed=seed, cache_dir=cache_dir, vocab_size=vocab_size,
                                         eod_id=eod_id, reset_position_ids=data.reset_position_ids,
                                         eod_mask_loss=data.eod_mask_loss)
    if train is None or len(train) < num_samples:
        raise DataError(f"the training split of {data.blend} yields {0 if train is None else len(train)} samples of "
                         f"{seq_length} tokens, fewer than the {num_samples} the run needs; add data or check data.split")
    if valid_samples and (valid is None or len(valid) < valid_samples):
        raise DataError(f"the validation split of {data.blend} (data.split {data.split}) yields "
                         f"{0 if valid is None else len(valid)} samples of {seq_length} tokens, fewer than the "
                         f"{valid_samples} that training.eval_iterations x data.global_batch_size asks for; give it a "
                         f"larger share in data.split or lower training.eval_iterations")
    return train, valid if valid_samples else None


class MicroBatches:
    """This DP rank's micro-batches of one iteration, from a position in the stage.

    The batch sizes were checked against the data-parallel size with the config
    (config/validate.py), before any process group existed.
    """

    def __init__(self, dataset, *, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int):
        self.dataset, self.global_batch, self.micro_batch = dataset, global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_microbatches = global_batch // (micro_batch * dp_size)

    def sample_index(self, iteration_in_stage: int, micro_batch: int, row: int) -> int:
        """The dataset index of row `row` of micro-batch `micro_batch` of an iteration, on this DP rank."""
        return (iteration_in_stage * self.global_batch + micro_batch * self.micro_batch * self.dp_size
                + self.dp_rank * self.micro_batch + row)

    def iteration(self, iteration_in_stage: int) -> List[Dict[str, torch.Tensor]]:
        batches = []
        for j in range(self.num_microbatches):
            start = self.sample_index(iteration_in_stage, j, 0)
            samples = [self.dataset[start + k] for k in range(self.micro_batch)]
            batches.append({key: torch.stack([torch.as_tensor(np.asarray(s[key])) for s in samples])
                            for key in ("tokens", "labels", "loss_mask", "position_ids")})
        return batches


def iterators_for_chunks(batches: List[Dict[str, torch.Tensor]], num_chunks: int) -> List[Iterator] | Iterator:
    """One iterator per virtual-pipeline chunk over the same micro-batches (megatron-core's contract)."""
    if num_chunks == 1:
        return iter(batches)
    return [iter(batches) for _ in range(num_chunks)]
