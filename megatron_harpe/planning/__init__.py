"""harpe-plan: memory per GPU and step time of a training layout, and a search over layouts.

Pure arithmetic (no torch, no megatron-core) except `measure`, which checks the arithmetic against
the tensors of a built model. docs/planning.md describes the model, its assumptions and its
validation.
"""
