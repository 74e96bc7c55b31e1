"""Check 2: the angle every rank applies to every head, at positions up to the run's last, against float64.

Why separate from layout parity: parity compares the layout with a reference built by the same rotary code, so a
base that is wrong everywhere (one K/V group's base swapped with another's, a scaling factor dropped) agrees with
itself. Here the expectation is computed independently, in float64 with numpy, from the configured bases and
nothing else: which positions a CP rank holds (chunks r and 2cp-1-r of 2cp), which heads a TP rank holds and which
K/V group (so which base) each query head reads.

The module is asked exactly as GPTModel asks it during training at the run's full length (its cached table is the
one the layers get); for a table that would not fit the probe's memory budget, the last positions of the run are
asked (offset), which are the ones that matter.

Tolerance: an fp32 angle is position x inverse frequency, each rounded: a few units in the last place of the angle
(2^-24 relative each), plus ln(base) of them when the exponent 2i/dim is itself inexact in fp32 (dims that are
not powers of two); so |error| <= (4 + ln(largest base)) * 2^-24 * |angle| + 1e-6 rad. At position 131,071 and
base 5e6 that is ~0.04 rad at the highest frequency; one group's base swapped, or a CP chunk in the wrong place,
is wrong by radians.
"""
from __future__ import annotations

import math
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from megatron.core import parallel_state as ps

from megatron_harpe.config.model import ModelConfig
from megatron_harpe.preflight.layout_run import gather_objects
from megatron_harpe.preflight.positions import rotary_module
from megatron_harpe.preflight.result import FAIL, NOT_RUN, PASS, CheckResult
from megatron_harpe.rope.harpe_rotary import rotary_dim

NAME = "rotary at far positions"
#: angles a rank asks its module for at most (elements of its [positions, heads, dim] fp32 table: 16 MiB; 32 CPU
#: ranks of a 7B twin each hold one): a 128k run of 32 heads at CP 4 is checked over its last 32,768 positions
TABLE_BUDGET = 1 << 22
#: positions compared in float64 at a time
ROWS = 4096
ULP = 2.0 ** -24


def expected_inverse_frequencies(model_cfg: ModelConfig) -> Optional[np.ndarray]:
    """[groups, dim/2] float64 inverse frequencies of every K/V group; None for a kind not re-derived here."""
    pos = model_cfg.position
    dim = rotary_dim(model_cfg.head_dim, model_cfg.rotary_percent)
    exponents = np.arange(0, dim, 2, dtype=np.float64) / dim
    groups = model_cfg.groups
    if pos.kind == "harpe":
        bases = np.asarray(pos.bases, dtype=np.float64)
        return bases[:, None] ** -exponents[None, :]
    if pos.kind == "yarn":
        return None
    inv = float(pos.base) ** -exponents
    if pos.kind == "pi":
        inv = inv / float(pos.interpolation_factor)
    elif pos.kind == "llama3":
        factor, low, high = float(pos.llama3_factor), pos.llama3_low_freq_factor, pos.llama3_high_freq_factor
        original = float(pos.llama3_original_max_position_embeddings)
        wavelength = 2 * math.pi / inv
        smooth = np.clip((original / wavelength - low) / (high - low), 0.0, 1.0)
        inv = np.where(wavelength < original / high, inv,
                       np.where(wavelength > original / low, inv / factor, (1 - smooth) * inv / factor + smooth * inv))
    return np.tile(inv, (groups, 1))


def expected_positions(length: int, cp: int, cp_rank: int, offset: int) -> np.ndarray:
    """The positions CP rank `cp_rank` should hold of a sequence of `length`: chunks r and 2cp-1-r."""
    if cp == 1:
        return np.arange(length, dtype=np.float64) + offset
    chunk = length // (2 * cp)
    first = np.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    second = np.arange((2 * cp - 1 - cp_rank) * chunk, (2 * cp - cp_rank) * chunk)
    return np.concatenate([first, second]).astype(np.float64) + offset


def _window(target: int, cp: int, heads_local: int, dim: int) -> Tuple[int, int]:
    """(length, offset) to ask the module for: the run's whole length if its table fits the budget, else the
    longest multiple of 2*cp that does, ending at the run's last position."""
    unit = 2 * cp if cp > 1 else 1
    fits = TABLE_BUDGET * cp // max(heads_local * dim, 1)
    if target <= fits:
        return target, 0
    length = max(unit, fits // unit * unit)
    return length, target - length


def _angles_per_query_head(module, table) -> np.ndarray:
    """[s, heads_local or 1, dim] float64: the angles each local query head is rotated by."""
    if isinstance(table, tuple):  # YaRN returns (angles, mscale)
        table = table[0]
    query = module.query_and_key_angles(table)[0] if hasattr(module, "query_and_key_angles") else table
    return query.detach().float().cpu().numpy()[:, 0]  # fp32 as applied; float64 per block of rows below


def rank_probe(model_cfg: ModelConfig, target: int, chunks) -> Dict[str, Any]:
    """This rank's comparison, for every model chunk's rotary module."""
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    inv = expected_inverse_frequencies(model_cfg)
    dim = rotary_dim(model_cfg.head_dim, model_cfg.rotary_percent)
    heads_local = model_cfg.num_attention_heads // tp
    per_group = model_cfg.num_attention_heads // model_cfg.groups
    bases = model_cfg.position.bases if model_cfg.position.kind == "harpe" else [model_cfg.position.base]
    ulps = 4 + math.log(max(bases))
    worst = {"ratio": 0.0}
    length, offset = _window(target, cp, heads_local, dim)
    for chunk in chunks:
        module = rotary_module(chunk)
        if getattr(module, "fused", False):  # HARPE's Triton kernel: only the inverse frequencies are the module's
            got = module.inv_freq.detach().double().cpu().numpy()
            groups_local = model_cfg.groups // tp
            want = inv[tp_rank * groups_local:(tp_rank + 1) * groups_local]
            ratio = float(np.max(np.abs(got - want) / (ulps * ULP * np.abs(want) + 1e-30)))
            if ratio > worst["ratio"]:
                worst = {"ratio": ratio, "what": "inverse frequencies (fused kernel)", "rank": dict(tp=tp_rank,
                         cp=cp_rank)}
            continue
        angles = _angles_per_query_head(module, module(length, offset))  # [s_local, heads_local or 1, dim]
        positions = expected_positions(length, cp, cp_rank, offset)
        if angles.shape[0] != positions.shape[0]:
            return {"ratio": math.inf, "what": f"the module returned {angles.shape[0]} positions on CP rank "
                                               f"{cp_rank}, the rank holds {positions.shape[0]}",
                    "rank": dict(tp=tp_rank, cp=cp_rank)}
        heads = angles.shape[1]
        for h in range(heads):
            group = (tp_rank * heads_local + h) // per_group if heads > 1 else 0
            for first in range(0, len(positions), ROWS):
                rows = slice(first, first + ROWS)
                freqs = positions[rows, None] * inv[group][None, :]  # [rows, dim/2]
                want = (np.stack([freqs, freqs], -1).reshape(len(freqs), dim) if model_cfg.rotary_interleaved
                        else np.concatenate([freqs, freqs], -1))
                got = angles[rows, h].astype(np.float64)
                err = np.abs(got - want)
                ratios = err / (ulps * ULP * np.abs(want) + 1e-6)
                k = int(np.argmax(ratios))
                ratio = float(ratios.flat[k])
                if ratio > worst["ratio"]:
                    row, col = divmod(k, dim)
                    worst = {"ratio": ratio, "rank": dict(tp=tp_rank, cp=cp_rank), "head": tp_rank * heads_local + h,
                             "position": int(positions[first + row]), "dim": col, "got": float(got[row, col]),
                             "want": float(want[row, col]), "abs_error": float(err[row, col])}
        del angles
        if hasattr(module, "_cache_key"):  # HARPE's module keeps its last table: not this probe's
            module._cache_key = module._cache_value = None
    worst["positions"] = [int(offset), int(offset + length - 1)]
    return worst


def rotary_check(model_cfg: ModelConfig, target: int, chunks) -> CheckResult:
    """Collective: every rank compares its own angles; the verdict (worst over ranks) on every rank."""
    started = time.perf_counter()
    if expected_inverse_frequencies(model_cfg) is None:
        return CheckResult(NAME, NOT_RUN, f"{model_cfg.position.kind}: YaRN's blended frequencies are not re-derived "
                                          f"here; its angles are megatron-core's (YarnRotaryEmbedding)")
    probes = gather_objects(rank_probe(model_cfg, target, chunks))
    worst = max(probes, key=lambda p: p["ratio"])
    bases = model_cfg.position.bases if model_cfg.position.kind == "harpe" else [model_cfg.position.base]
    tolerance = (f"|angle - float64| <= (4 + ln {max(bases):g}) x 2^-24 x |angle| + 1e-6 rad (fp32 rounding of "
                 f"position x inverse frequency)")
    lo, hi = worst.get("positions", [0, target - 1])
    where = f"positions {lo:,}..{hi:,} on every rank" if "positions" in worst else "every rank"
    if worst["ratio"] <= 1.0:
        summary = (f"{len(probes)} ranks, every local head, {where}: worst error {worst['ratio']:.2g} of the bound")
        return CheckResult(NAME, PASS, summary, tolerance, {"worst": worst, "ranks": len(probes)},
                           time.perf_counter() - started)
    if "head" in worst:
        summary = (f"rank TP {worst['rank']['tp']} CP {worst['rank']['cp']}, head {worst['head']}, position "
                   f"{worst['position']:,}, dim {worst['dim']}: angle {worst['got']:.6g} rad, expected "
                   f"{worst['want']:.6g} from the configured bases ({worst['ratio']:.3g} x the bound)")
    else:
        summary = f"rank TP {worst['rank']['tp']} CP {worst['rank']['cp']}: {worst.get('what')}"
    return CheckResult(NAME, FAIL, summary, tolerance, {"worst": worst, "ranks": len(probes)},
                       time.perf_counter() - started)
