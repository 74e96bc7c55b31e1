"""HARPE: base sets and the per-head rotary module.

`HarpeRotaryEmbedding` is imported lazily: the base-set tools (`harpe-bases`) must start fast
and must not import megatron-core (or touch CUDA) just to print a list of numbers.
"""


def __getattr__(name):
    if name == "HarpeRotaryEmbedding":
        from megatron_harpe.rope.harpe_rotary import HarpeRotaryEmbedding

        return HarpeRotaryEmbedding
    raise AttributeError(name)
