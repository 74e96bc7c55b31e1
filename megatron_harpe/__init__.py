"""megatron-harpe: single-stage long-context continual pretraining with HARPE on megatron-core."""
__version__ = "0.1.0"
