"""Long-context evaluation: sliding-window perplexity, RULER-style needle tasks, needle heatmaps, passkey.

    harpe-eval ppl|niah|needle|passkey|report ...        (cli.py; docs/evaluation.md)

    from megatron_harpe.evaluation import load_model, run_niah, run_grid, run_ppl, demo_eval
    lm = load_model("hf/llama2-7b-harpe-128k")            # HF directory, or a megatron checkpoint (exported)
    summary, markdown, stats = run_niah(lm, "out/niah", tasks=["niah_single_1"], lengths=[4096], samples=25)

Modules: model.py (loading, tokenizer adapter, chunked NLL, batched greedy generation),
prompts.py (haystacks, prompts fitted to token budgets, needle depths), tasks.py (the eight
NiaH tasks, classic needle, passkey), scoring.py (RULER's string matching), perplexity.py
(Press-style sliding windows), results.py (resumable result files), report.py (tables,
heatmaps), runner.py (the generation loop), commands.py (the evaluations), demo.py.
Importing this package loads neither torch nor transformers.
"""
from __future__ import annotations

__all__ = ["EvalError", "load_model", "run_niah", "run_grid", "run_ppl", "demo_eval", "NIAH_TASKS",
           "string_match_all", "string_match_part", "press_windows"]


def __getattr__(name):
    if name == "EvalError":
        from megatron_harpe.evaluation.errors import EvalError
        return EvalError
    if name == "load_model":
        from megatron_harpe.evaluation.model import load_model
        return load_model
    if name in ("run_niah", "run_grid", "run_ppl"):
        from megatron_harpe.evaluation import commands
        return getattr(commands, name)
    if name == "demo_eval":
        from megatron_harpe.evaluation.demo import demo_eval
        return demo_eval
    if name == "NIAH_TASKS":
        from megatron_harpe.evaluation.tasks import NIAH_TASKS
        return NIAH_TASKS
    if name in ("string_match_all", "string_match_part"):
        from megatron_harpe.evaluation import scoring
        return getattr(scoring, name)
    if name == "press_windows":
        from megatron_harpe.evaluation.perplexity import press_windows
        return press_windows
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
