"""Far positions on a short sequence: every position the model's rotary module hands out, shifted.

The twin runs a few hundred tokens; a 128k run's trouble lives at positions near 131,071 (an fp32 angle that has
lost its low bits, a base that only shows at long range). Wrapping the model's rotary module (the one object
GPTModel asks for angles: `rotary_pos_emb(seq_len, offset, ...)` and `get_rotary_seq_len`) and adding a fixed
offset to the `offset` it is asked for makes positions offset..offset+s-1 out of a sequence of s tokens, on every
path megatron-core applies the table: bshd, CP-sliced (the module slices its own chunks), packed thd (each
document's rows are taken from the table's start, so each document starts at the offset). This is an instance
put in place of our model's own module, not a change to megatron-core's classes; the reference model gets the
same wrapper, so both sides rotate the same positions.
"""
from __future__ import annotations

import torch

from megatron_harpe.models.unwrap import unwrap_model


class ShiftedRotary(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, shift: int):
        super().__init__()
        self.inner = inner
        self.shift = int(shift)

    def forward(self, max_seq_len: int, offset: int = 0, *args, **kwargs):
        return self.inner(max_seq_len, offset + self.shift, *args, **kwargs)

    def get_rotary_seq_len(self, *args, **kwargs):
        return self.inner.get_rotary_seq_len(*args, **kwargs)


def rotary_module(model: torch.nn.Module) -> torch.nn.Module:
    """The rotary module a model (DDP-wrapped or not) applies, without a ShiftedRotary around it."""
    module = unwrap_model(model).rotary_pos_emb
    return module.inner if isinstance(module, ShiftedRotary) else module


def fused_harpe(model: torch.nn.Module) -> bool:
    """HARPE's Triton kernel computes positions itself (from 0): a shift cannot reach it."""
    return bool(getattr(rotary_module(model), "fused", False))


def shift_positions(chunks, shift: int) -> None:
    """Make every chunk rotate positions shift..shift+s-1 (0 puts the model's own module back)."""
    for chunk in chunks:
        model = unwrap_model(chunk)
        inner = rotary_module(chunk)
        model.rotary_pos_emb = ShiftedRotary(inner, shift) if shift else inner
