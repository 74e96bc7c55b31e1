"""Tests for megatron_harpe.training.metrics: FLOPs formula, peak memory, MetricsLogger outputs, summary."""
import glob
import io
import json
import math
import os
import re
import sys

import pytest
import torch

from megatron_harpe.training.metrics import (
    MetricsLogger,
    device_peak_memory_bytes,
    flops_per_token_breakdown,
    model_flops_per_token,
    summary_line,
)
from megatron_harpe.training.metrics import memory as metrics_memory
from megatron_harpe.training.metrics import tensorboard as metrics_tensorboard

GIB = 1 << 30


# ------------------------------------------------------------------------------------ FLOPs
def test_flops_small_config_by_hand():
    # L=2, h=64, f=176, a=4 heads, g=2 groups (d=16), V=100, s=32, SwiGLU, causal.
    # per layer, forward, per token:
    #   QKV    2*64*(4*16 + 2*2*16) = 16384
    #   out    2*64*64              =  8192
    #   MLP    2*64*176*3           = 67584
    #   attn   2*2*64*32 / 2        =  4096      -> 96256 per layer, 192512 for 2 layers
    #   head   2*64*100             = 12800      -> forward 205312, training x3 = 615936
    got = model_flops_per_token(2, 64, 176, 4, 2, 100, 32)
    assert got == 615936
    # full-square attention adds 3 * 2 layers * 4096
    assert model_flops_per_token(2, 64, 176, 4, 2, 100, 32, causal=False) == 615936 + 3 * 2 * 4096
    # a plain (non-gated) MLP has two matrices instead of three: 3 * 2 layers * 2*64*176 less
    assert model_flops_per_token(2, 64, 176, 4, 2, 100, 32, gated_linear_unit=False) == 615936 - 3 * 2 * 22528
    parts = flops_per_token_breakdown(2, 64, 176, 4, 2, 100, 32)
    assert parts["attention"] == 3 * 2 * 4096
    assert parts["lm_head"] == 3 * 12800
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")


def _count_training_flops_with_torch(L, h, f, a, g, V, s):
    """Independent count: run forward+backward of a plain-torch Llama-style decoder under FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    d = h // a

    def lin(i, o):
        return torch.nn.Linear(i, o, bias=False)

    layers = []
    for _ in range(L):
        layers.append(
            dict(q=lin(h, a * d), k=lin(h, g * d), v=lin(h, g * d), o=lin(a * d, h),
                 gate=lin(h, f), up=lin(h, f), down=lin(f, h))
        )
    emb = torch.nn.Embedding(V, h)
    head = lin(h, V)
    tokens = torch.randint(0, V, (1, s))
    with FlopCounterMode(display=False) as counter:
        x = emb(tokens)
        for p in layers:
            q = p["q"](x).view(1, s, a, d).transpose(1, 2)
            k = p["k"](x).view(1, s, g, d).transpose(1, 2).repeat_interleave(a // g, dim=1)
            v = p["v"](x).view(1, s, g, d).transpose(1, 2).repeat_interleave(a // g, dim=1)
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)  # full s x s square
            att = torch.softmax(scores, dim=-1) @ v
            x = x + p["o"](att.transpose(1, 2).reshape(1, s, a * d))
            x = x + p["down"](torch.nn.functional.silu(p["gate"](x)) * p["up"](x))
        head(x).float().logsumexp(-1).sum().backward()
    return counter.get_total_flops() / s


def test_flops_match_torch_flop_counter():
    # torch counts the full attention square, so compare with causal=False.
    cfg = (2, 64, 176, 4, 2, 100, 32)
    assert _count_training_flops_with_torch(*cfg) == model_flops_per_token(*cfg, causal=False)


def test_flops_llama2_7b():
    L, h, f, a, g, V = 32, 4096, 11008, 32, 32, 32000
    n_params = 6_738_415_616  # Llama-2-7B, untied embeddings
    non_attention = model_flops_per_token(L, h, f, a, g, V, seq_length=0)
    # 6*N within ~2% (the input embedding, 1.9% of N, is a lookup, not a matmul)...
    assert non_attention == pytest.approx(6 * n_params, rel=0.02)
    # ...and exactly 6 * (N - input embedding - norm weights)
    norms = L * 2 * h + h
    assert non_attention == 6 * (n_params - V * h - norms)
    # attention at 4k by hand: 3 (fwd+bwd) * 32 layers * 2 matmuls * 2 FLOPs * 4096 (a*d) * 4096 (s) / 2
    attention_4k = 3 * 32 * 2 * 2 * 4096 * 4096 / 2
    assert attention_4k == 3_221_225_472
    total = model_flops_per_token(L, h, f, a, g, V, seq_length=4096)
    assert total - non_attention == attention_4k
    assert model_flops_per_token(L, h, f, a, g, V, 4096, causal=False) - non_attention == 2 * attention_4k
    assert total == pytest.approx(42.86e9, rel=1e-3)


def test_flops_llama3_8b_gqa():
    L, h, f, a, g, V = 32, 4096, 14336, 32, 8, 128256
    n_params = 8_030_261_248  # Llama-3-8B
    norms = L * 2 * h + h
    assert model_flops_per_token(L, h, f, a, g, V, 0) == 6 * (n_params - V * h - norms)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_query_groups=3), "num_query_groups"),
        (dict(hidden_size=65), "kv_channels"),
        (dict(num_layers=0), "num_layers"),
        (dict(seq_length=-1), "seq_length"),
    ],
)
def test_flops_bad_input(kwargs, match):
    cfg = dict(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
               num_query_groups=2, vocab_size=100, seq_length=32)
    cfg.update(kwargs)
    with pytest.raises(ValueError, match=match):
        model_flops_per_token(**cfg)


# ------------------------------------------------------------------------------------ memory
def test_device_peak_memory_bytes_cpu():
    peak = device_peak_memory_bytes()
    with open("/proc/self/status") as fh:
        hwm_kib = int(next(line for line in fh if line.startswith("VmHWM")).split()[1])
    assert peak > 10 * (1 << 20)
    assert peak == pytest.approx(hwm_kib * 1024, rel=0.05)


# ------------------------------------------------------------------------------------ logger
@pytest.fixture
def fixed_memory(monkeypatch):
    monkeypatch.setattr(metrics_memory, "device_peak_memory_bytes", lambda: int(61.2 * GIB))


def _read_jsonl(path):
    def no_nan(token):
        raise AssertionError(f"non-JSON constant {token} in metrics.jsonl")

    with open(path) as fh:
        return [json.loads(line, parse_constant=no_nan) for line in fh]


def _log(logger, it, loss=2.0, lr=1e-4, grad_norm=1.0, tokens=1000, elapsed_s=0.5, flops=1e12,
         world_size=2, extra=None):
    logger.log_iteration(it, loss=loss, lr=lr, grad_norm=grad_norm, tokens=tokens, elapsed_s=elapsed_s,
                         flops=flops, world_size=world_size, extra=extra)


def test_stdout_line_format(tmp_path, capsys, fixed_memory):
    logger = MetricsLogger(str(tmp_path), is_logging_rank=True, total_iterations=1000, tensorboard=False,
                           peak_tflops_per_device=989.0, start_iteration=119)
    world = 8
    logger.log_iteration(120, loss=2.31449, lr=1.2e-5, grad_norm=0.8421, tokens=22715, elapsed_s=1.84,
                         flops=98.3e12 * 1.84 * world, world_size=world)
    logger.close()
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [
        "iter 120/1000 | loss 2.3145 | lr 1.20e-05 | grad norm 0.842 | 12,345 tok/s | 98.3 TFLOP/s/dev"
        " | MFU 9.9% | mem 61.2 GiB | 1.84 s/it"
    ]


def test_stdout_line_without_peak_grad_norm_or_total(tmp_path, capsys, fixed_memory):
    logger = MetricsLogger(str(tmp_path), is_logging_rank=True, total_iterations=None, tensorboard=False)
    _log(logger, 1, grad_norm=None)
    logger.close()
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert line.startswith("iter 1 | loss 2.0000 | lr 1.00e-04 | 2,000 tok/s | 1.0 TFLOP/s/dev | mem 61.2 GiB")
    assert "MFU" not in line and "grad norm" not in line


def test_jsonl_one_line_per_iteration_and_flushed(tmp_path, fixed_memory):
    logger = MetricsLogger(str(tmp_path), is_logging_rank=True, total_iterations=5, tensorboard=False,
                           peak_tflops_per_device=10.0)
    for it in range(1, 6):
        _log(logger, it, loss=3.0 - 0.1 * it, extra={"consumed_tokens": 1000 * it})
        # readable while the job runs: each line is on disk before the next iteration
        assert len(_read_jsonl(tmp_path / "metrics.jsonl")) == it
    logger.close()
    rows = _read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5]
    for key in ("iteration", "loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_device", "mfu",
                "peak_memory_bytes", "seconds_per_iteration", "consumed_tokens"):
        assert key in rows[0], key
    r = rows[2]
    assert r["loss"] == pytest.approx(2.7)
    assert r["tokens_per_s"] == pytest.approx(2000.0)
    assert r["tflops_per_device"] == pytest.approx(1.0)  # 1e12 / 2 devices / 0.5 s
    assert r["mfu"] == pytest.approx(0.1)
    assert r["seconds_per_iteration"] == pytest.approx(0.5)
    assert r["peak_memory_bytes"] == int(61.2 * GIB)
    assert r["consumed_tokens"] == 3000
    assert "nonfinite" not in r


def test_interval_averaging(tmp_path, capsys, fixed_memory):
    logger = MetricsLogger(str(tmp_path), is_logging_rank=True, total_iterations=10, tensorboard=False,
                           interval=4)
    for it in range(1, 11):
        _log(logger, it, loss=float(it), lr=it * 1e-5, grad_norm=(None if it % 2 else float(it)),
             tokens=100 * it, elapsed_s=0.1 * it, flops=1e12 * it, world_size=1,
             extra={"eval_loss": 5.0} if it == 2 else None)
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split(" | ")[0] for ln in lines] == ["iter 4/10", "iter 8/10", "iter 10/10"]
    rows = _read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [4, 8, 10]
    first, second, last = rows
    assert first["loss"] == pytest.approx(2.5)  # mean of 1..4
    assert first["lr"] == pytest.approx(4e-5)  # value at the logged iteration
    assert first["grad_norm"] == pytest.approx(3.0)  # mean of the given ones: 2, 4
    assert first["tokens_per_s"] == pytest.approx(1000.0)  # 1000 tokens / 1.0 s
    assert first["tflops_per_device"] == pytest.approx(10.0)  # 10e12 / 1.0 s
    assert first["seconds_per_iteration"] == pytest.approx(0.25)
    assert first["eval_loss"] == 5.0 and "eval_loss" not in second  # extras merged within the interval
    assert second["loss"] == pytest.approx(6.5)
    assert last["loss"] == pytest.approx(9.5)  # partial interval at the last iteration
    assert last["seconds_per_iteration"] == pytest.approx(0.95)
    logger.close()
    assert len(_read_jsonl(tmp_path / "metrics.jsonl")) == 3  # nothing pending, nothing extra


def test_close_writes_pending_partial_interval(tmp_path, fixed_memory):
    with MetricsLogger(str(tmp_path), is_logging_rank=True, total_iterations=None, tensorboard=False,
                       interval=10) as logger:
        for it in range(1, 14):
            _log(logger, it, loss=float(it))
    rows = _read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [10, 13]
    assert rows[1]["loss"] == pytest.approx(12.0)


def test_nonfinite_loss(tmp_path, capsys, fixed_memory):
    logger = MetricsLogger(str(tmp_path), is_logging_rank=True, total_iterations=6, tensorboard=False)
    _log(logger, 1, loss=2.0)
    _log(logger, 2, loss=float("nan"), grad_norm=float("inf"))
    _log(logger, 3, loss=1.5)
    logger.close()
    rows = _read_jsonl(tmp_path / "metrics.jsonl")
    assert rows[1]["loss"] is None and rows[1]["grad_norm"] is None
    assert rows[1]["nonfinite"] is True
    assert sorted(rows[1]["nonfinite_keys"]) == ["grad_norm", "loss"]
    assert "nonfinite" not in rows[0] and "nonfinite" not in rows[2]
    assert "loss nan" in capsys.readouterr().out.splitlines()[1]
    s = logger.summary()
    assert s["min_loss"] == 1.5 and s["nonfinite_iterations"] == 1 and s["first_loss"] == 2.0


def test_nonfinite_loss_is_not_averaged_away(tmp_path, fixed_memory):
    logger = MetricsLogger(str(tmp_path), is_logging_rank=True, total_iterations=4, tensorboard=False,
                           interval=4)
    for it, loss in enumerate([2.0, float("inf"), 2.0, 2.0], start=1):
        _log(logger, it, loss=loss)
    logger.close()
    (row,) = _read_jsonl(tmp_path / "metrics.jsonl")
    assert row["loss"] is None and row["nonfinite"] is True


def test_resume_truncates_jsonl(tmp_path, fixed_memory):
    path = tmp_path / "metrics.jsonl"
    first = MetricsLogger(str(tmp_path), is_logging_rank=True, total_iterations=8, tensorboard=False)
    for it in range(1, 9):
        _log(first, it, loss=10.0 + it)
        if it == 3:
            first.log_event("saved checkpoint at iteration 3")
        if it == 5:
            first.log_event("saved checkpoint at iteration 5")
        if it == 7:
            first.log_event("loss spike")
    # the attempt crashes mid-write: no close(), a torn last line
    first._file.flush()
    with open(path, "a") as fh:
        fh.write('{"iteration": 9, "loss": 1')

    second = MetricsLogger(str(tmp_path), is_logging_rank=True, total_iterations=8, tensorboard=False,
                           start_iteration=5)
    assert second.dropped_on_resume == 5  # iterations 6, 7, 8, the event at 7, the torn line
    kept = _read_jsonl(path)
    assert [r.get("event") for r in kept if "event" in r] == [
        "saved checkpoint at iteration 3", "saved checkpoint at iteration 5"]
    for it in range(6, 9):
        _log(second, it, loss=float(it))
    second.close()
    rows = [r for r in _read_jsonl(path) if "event" not in r]
    assert [r["iteration"] for r in rows] == list(range(1, 9))  # each iteration exactly once
    assert [r["loss"] for r in rows[5:]] == [6.0, 7.0, 8.0]  # the resumed run's values
    first._file.close()


def test_fresh_run_in_old_dir_starts_empty_history(tmp_path, fixed_memory):
    with MetricsLogger(str(tmp_path), is_logging_rank=True, total_iterations=3, tensorboard=False) as lg:
        for it in range(1, 4):
            _log(lg, it)
    with MetricsLogger(str(tmp_path), is_logging_rank=True, total_iterations=3, tensorboard=False) as lg:
        _log(lg, 1, loss=7.0)
    rows = _read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["iteration"], r["loss"]) for r in rows] == [(1, 7.0)]


def test_non_logging_rank_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    logger = MetricsLogger(str(run_dir), is_logging_rank=False, total_iterations=3, tensorboard=True,
                           progress_bar=True)
    for it in range(1, 4):
        _log(logger, it)
    logger.log_event("hello")
    summary = logger.summary()
    logger.close()
    logger.close()
    assert not run_dir.exists()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert summary["iterations"] is None and "last_loss" in summary


def test_event_lines(tmp_path, capsys, fixed_memory):
    logger = MetricsLogger(str(tmp_path), is_logging_rank=True, total_iterations=None, tensorboard=False,
                           start_iteration=40)
    logger.log_event("resumed from checkpoint at iteration 40")
    _log(logger, 41)
    logger.log_event("saving checkpoint")
    logger.close()
    assert capsys.readouterr().out.splitlines()[0] == "resumed from checkpoint at iteration 40"
    events = [r for r in _read_jsonl(tmp_path / "metrics.jsonl") if "event" in r]
    assert [(e["event"], e["iteration"]) for e in events] == [
        ("resumed from checkpoint at iteration 40", 40), ("saving checkpoint", 41)]


def test_summary(tmp_path, fixed_memory):
    logger = MetricsLogger(str(tmp_path), is_logging_rank=True, total_iterations=4, tensorboard=False,
                           interval=2)
    for it, loss in enumerate([3.0, 1.0, 2.0, 2.5], start=1):
        _log(logger, it, loss=loss, tokens=1000, elapsed_s=0.5 * it)
    s = logger.summary()
    logger.close()
    assert s["iterations"] == 4 and s["first_iteration"] == 1 and s["last_iteration"] == 4
    assert (s["first_loss"], s["last_loss"], s["min_loss"]) == (3.0, 2.5, 1.0)
    assert s["total_tokens"] == 4000
    assert s["total_time_s"] == pytest.approx(5.0)
    assert s["mean_tokens_per_s"] == pytest.approx(800.0)
    assert s["peak_memory_bytes"] == int(61.2 * GIB)
    assert summary_line(s) == "loss 3.0000 -> 2.5000, 800 tok/s, peak mem 61.20 GiB"


@pytest.mark.parametrize(
    "summary, expected",
    [
        # thousands separator, and the last loss printed even when it is not finite
        (dict(first_loss=2.0, last_loss=float("nan"), mean_tokens_per_s=12345.6,
              peak_memory_bytes=3 * GIB // 2),
         "loss 2.0000 -> nan, 12,346 tok/s, peak mem 1.50 GiB"),
        # no timed step and no memory reading: those parts are left out, not printed as 0
        (dict(first_loss=1.25, last_loss=1.0, mean_tokens_per_s=None, peak_memory_bytes=0),
         "loss 1.2500 -> 1.0000"),
        (dict(first_loss=None, last_loss=None, mean_tokens_per_s=0.0, peak_memory_bytes=GIB),
         "peak mem 1.00 GiB"),
    ],
)
def test_summary_line_leaves_out_missing_parts(summary, expected):
    assert summary_line(summary) == expected


def test_summary_line_of_a_non_logging_rank_is_empty(tmp_path):
    logger = MetricsLogger(str(tmp_path / "run"), is_logging_rank=False, total_iterations=3)
    _log(logger, 1)
    assert summary_line(logger.summary()) == ""
    logger.close()


def test_extra_reserved_key_rejected(tmp_path):
    logger = MetricsLogger(str(tmp_path), is_logging_rank=True, total_iterations=1, tensorboard=False)
    with pytest.raises(ValueError, match="loss"):
        _log(logger, 1, extra={"loss": 1.0})
    logger.close()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="interval"):
        MetricsLogger(str(tmp_path), is_logging_rank=True, total_iterations=1, interval=0)
    with pytest.raises(ValueError, match="peak_tflops_per_device"):
        MetricsLogger(str(tmp_path), is_logging_rank=True, total_iterations=1, peak_tflops_per_device=0)


class _FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_tty_stderr(tmp_path, capsys, monkeypatch, fixed_memory):
    # pytest's captured stderr is not a TTY: no bar, stderr stays clean
    with MetricsLogger(str(tmp_path / "a"), is_logging_rank=True, total_iterations=3, tensorboard=False) as lg:
        assert lg._bar is None
        _log(lg, 1)
    assert capsys.readouterr().err == ""
    fake = _FakeTTY()
    monkeypatch.setattr(sys, "stderr", fake)
    with MetricsLogger(str(tmp_path / "b"), is_logging_rank=True, total_iterations=3, tensorboard=False) as lg:
        assert lg._bar is not None
        for it in range(1, 4):
            _log(lg, it)
    assert "3/3" in fake.getvalue()
    assert capsys.readouterr().out.count("iter ") == 3
    with MetricsLogger(str(tmp_path / "c"), is_logging_rank=True, total_iterations=3, tensorboard=False,
                       progress_bar=False) as lg:
        assert lg._bar is None


# ------------------------------------------------------------------------------------ TensorBoard
def _scalars(tb_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_tensorboard_scalars(tmp_path, fixed_memory):
    pytest.importorskip("tensorboard")
    with MetricsLogger(str(tmp_path), is_logging_rank=True, total_iterations=4, tensorboard=True,
                       interval=2, peak_tflops_per_device=10.0) as lg:
        for it in range(1, 5):
            _log(lg, it, loss=float(it), extra={"consumed_tokens": it})
    assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
    assert _scalars(tmp_path / "tensorboard", "train/loss") == [(2, 1.5), (4, 3.5)]
    assert [s for s, _ in _scalars(tmp_path / "tensorboard", "throughput/mfu")] == [2, 4]
    assert _scalars(tmp_path / "tensorboard", "extra/consumed_tokens") == [(2, 2.0), (4, 4.0)]


def test_tensorboard_resume_purges_later_steps(tmp_path, fixed_memory):
    pytest.importorskip("tensorboard")
    tb_dir = tmp_path / "tensorboard"
    first = MetricsLogger(str(tmp_path), is_logging_rank=True, total_iterations=6, tensorboard=True)
    for it in range(1, 7):
        _log(first, it, loss=10.0 + it)
    first.close()
    # event file names start with a Unix time; make the earlier attempt's file sort first even when both
    # attempts ran within the same second
    (old,) = glob.glob(str(tb_dir / "events.out.tfevents.*"))
    parts = os.path.basename(old).split(".")
    parts[3] = "%010d" % (int(parts[3]) - 100)
    os.rename(old, str(tb_dir / ".".join(parts)))

    with MetricsLogger(str(tmp_path), is_logging_rank=True, total_iterations=6, tensorboard=True,
                       start_iteration=4) as second:
        for it in (5, 6):
            _log(second, it, loss=float(it))
    assert _scalars(tb_dir, "train/loss") == [(1, 11.0), (2, 12.0), (3, 13.0), (4, 14.0), (5, 5.0), (6, 6.0)]


def test_missing_tensorboard_warns_once_and_continues(tmp_path, monkeypatch, fixed_memory):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    monkeypatch.setattr(metrics_tensorboard, "_warned", False)
    with pytest.warns(RuntimeWarning, match="tensorboard") as record:
        for name in ("a", "b"):
            with MetricsLogger(str(tmp_path / name), is_logging_rank=True, total_iterations=1) as lg:
                _log(lg, 1)
    assert len([w for w in record if "TensorBoard" in str(w.message)]) == 1
    assert not (tmp_path / "a" / "tensorboard").exists()
    assert len(_read_jsonl(tmp_path / "b" / "metrics.jsonl")) == 1


def test_line_regex_matches_documented_shape(tmp_path, capsys):
    # with the real memory probe: the shape holds whatever the numbers are
    with MetricsLogger(str(tmp_path), is_logging_rank=True, total_iterations=2, tensorboard=False,
                       peak_tflops_per_device=100.0) as lg:
        _log(lg, 1)
    line = capsys.readouterr().out.strip()
    pattern = (r"iter 1/2 \| loss \d+\.\d{4} \| lr \d\.\d{2}e[-+]\d{2} \| grad norm \d+\.\d{3} \| [\d,]+ tok/s"
               r" \| \d+\.\d TFLOP/s/dev \| MFU \d+\.\d% \| mem \d+\.\d GiB \| \d+\.\d{2} s/it")
    assert re.fullmatch(pattern, line), line
