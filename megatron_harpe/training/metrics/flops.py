"""Model FLOPs per token and MFU: pure arithmetic on the model shape, no I/O.

Kept apart from the logger so the counting convention (documented on :func:`flops_per_token_breakdown`)
can be read, tested and reused without a run directory.
"""
from __future__ import annotations

__all__ = ["flops_per_token_breakdown", "model_flops_per_token", "mfu"]


def flops_per_token_breakdown(
    num_layers: int,
    hidden_size: int,
    ffn_hidden_size: int,
    num_attention_heads: int,
    num_query_groups: int,
    vocab_size: int,
    seq_length: int,
    gated_linear_unit: bool = True,
    causal: bool = True,
    kv_channels: int | None = None,
) -> dict[str, float]:
    """Training FLOPs per token (forward + backward = 3x the forward matmul FLOPs) of a Llama-style decoder,
    split by component: ``qkv_projection``, ``output_projection``, ``mlp``, ``attention`` (the
    score/value matmuls, quadratic in the sequence length), ``lm_head`` and ``total``.

    Notation: ``L`` layers, ``h`` hidden size, ``f`` FFN hidden size, ``a`` attention heads, ``g`` query
    (K/V) groups, ``d`` head dimension (``kv_channels``, default ``h / a``), ``V`` vocabulary size,
    ``s`` sequence length. A matmul of an ``[m, k]`` by a ``[k, n]`` matrix costs ``2*m*k*n`` FLOPs (one
    multiply and one add per multiply-accumulate). Forward FLOPs per token::

        per layer:
          QKV projection (GQA)   2 * h * (a*d + 2*g*d)
          output projection      2 * a*d * h
          MLP                    2 * h * f * 3          (gated / SwiGLU: gate, up, down)
                                 2 * h * f * 2          (gated_linear_unit=False: up, down)
          attention matmuls      2 * 2 * a*d * s * c    (Q K^T scores and P V; c = 1/2 if causal else 1)
        LM head (once)           2 * h * V

        training = 3 * (L * per_layer + LM head)

    Causal attention (``c = 1/2``) counts only the half of the score matrix that is actually computed,
    the convention FlashAttention (and most MFU reports based on it) uses; Megatron-LM's own
    ``num_floating_point_operations`` counts the full ``s x s`` square even for causal models, so its
    numbers are higher by ``3 * L * 2*a*d*s`` per token. Pass ``causal=False`` to get that convention.

    Not counted (all O(h) per token, well under 1% at Llama sizes): norms, activations, softmax, rotary
    embedding, residual adds, the embedding lookup (a gather, no matmul) and the loss. Without the
    attention term this is ``6 * N_matmul`` with ``N_matmul`` the number of weights used in matmuls
    (all parameters except the input embedding and the norm weights), i.e. the familiar ``6 * N``.

    ``seq_length`` is the length the attention actually spans (the packed sequence length; with context
    parallelism still the full, not the per-rank, length). ``kv_channels`` is an optional extension for
    models whose head dimension is not ``h / a``.
    """
    for name, value in (
        ("num_layers", num_layers),
        ("hidden_size", hidden_size),
        ("ffn_hidden_size", ffn_hidden_size),
        ("num_attention_heads", num_attention_heads),
        ("num_query_groups", num_query_groups),
        ("vocab_size", vocab_size),
    ):
        if int(value) != value or value < 1:
            raise ValueError(f"model_flops_per_token: {name}={value!r} must be a positive integer")
    if int(seq_length) != seq_length or seq_length < 0:
        raise ValueError(f"model_flops_per_token: seq_length={seq_length!r} must be an integer >= 0")
    if num_attention_heads % num_query_groups:
        raise ValueError(
            f"model_flops_per_token: num_attention_heads={num_attention_heads} is not a multiple of "
            f"num_query_groups={num_query_groups}; set num_query_groups to a divisor of the head count"
        )
    if kv_channels is None:
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"model_flops_per_token: hidden_size={hidden_size} is not a multiple of "
                f"num_attention_heads={num_attention_heads}; pass kv_channels (the head dimension) explicitly"
            )
        kv_channels = hidden_size // num_attention_heads

    h, f, s, d = float(hidden_size), float(ffn_hidden_size), float(seq_length), float(kv_channels)
    a, g, L, V = float(num_attention_heads), float(num_query_groups), float(num_layers), float(vocab_size)
    fwd_to_train = 3.0  # forward + backward (grad wrt activations and wrt weights: 2x forward)

    qkv = 2.0 * h * (a * d + 2.0 * g * d)
    out = 2.0 * (a * d) * h
    mlp = 2.0 * h * f * (3.0 if gated_linear_unit else 2.0)
    attn = 2.0 * 2.0 * a * d * s * (0.5 if causal else 1.0)
    head = 2.0 * h * V

    parts = {
        "qkv_projection": fwd_to_train * L * qkv,
        "output_projection": fwd_to_train * L * out,
        "mlp": fwd_to_train * L * mlp,
        "attention": fwd_to_train * L * attn,
        "lm_head": fwd_to_train * head,
    }
    parts["total"] = sum(parts.values())
    return parts


def model_flops_per_token(*args, **kwargs) -> float:
    """Training FLOPs per token: the ``total`` of :func:`flops_per_token_breakdown` (same arguments)."""
    return flops_per_token_breakdown(*args, **kwargs)["total"]


def mfu(tflops_per_device: float | None, peak_tflops_per_device: float | None) -> float | None:
    """Model FLOPs utilisation as a fraction (0.1 = 10%), or ``None`` when either rate is unknown.

    ``None`` rather than 0 without a peak, so a CPU run or an unknown accelerator shows no MFU
    instead of a misleading one.
    """
    if tflops_per_device is None or not peak_tflops_per_device:
        return None
    return tflops_per_device / peak_tflops_per_device
