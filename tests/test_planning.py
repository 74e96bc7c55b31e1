"""harpe-plan (megatron_harpe/planning): its byte counts against built models, its search, its CLI.

The byte counts are checked exactly: weights, gradients and optimizer state against the tensors of a
model built the way harpe-train builds it (megatron-core DDP with fp32 gradient buffers, megatron-core's
optimizer, distributed or not), and activations against what autograd saves in a forward pass
(saved_tensors_hooks, dedup'd by storage), on one rank in this process and on two gloo ranks under
torchrun (TP with and without SP, CP, PP, DP with the distributed optimizer, full and selective
recompute). tools/bench_plan.py runs the larger set (a medium model, 4 ranks) and Megatron-LM's formula.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from megatron_harpe.planning.cli import main
from megatron_harpe.planning.hardware import GIB, Assumptions, gpu_named
from megatron_harpe.planning.memory import buffer_layout, chunk_parameters, model_state, plan_memory
from megatron_harpe.planning.reference import megatron_lm_estimate
from megatron_harpe.planning.search import evaluate, search
from megatron_harpe.planning.spec import PRESETS, Layout, LayoutError, ModelShape, Plan, Workload
from megatron_harpe.planning.validation import FULL, TINY, _plans
from tests.launch import REPO_ROOT

COMPONENTS = ("weights", "grads", "optimizer", "activations")

ONE_RANK = (_plans(TINY, "fp32", [Layout(), Layout(**FULL)])
            + _plans(TINY, "bf16", [Layout(dist_opt=True),
                                    Layout(recompute="selective", recompute_modules=("core_attn", "mlp"))]))
TWO_RANKS = _plans(TINY, "bf16", [Layout(tp=2, sp=True), Layout(cp=2),
                                  Layout(dp=2, dist_opt=True, overlap_grad_reduce=True, overlap_param_gather=True),
                                  Layout(pp=2), Layout(tp=2, sp=True, recompute="full", recompute_method="block",
                                                       recompute_num_layers=1)])


def _id(plan: Plan) -> str:
    return f"{plan.workload.precision}-{plan.layout.describe().replace(' ', '_')}"


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """(one-rank results, two-rank results): the two-rank launch runs while this process measures the
    one-rank plans (the machine has 2 cores; this halves the wait)."""
    from megatron_harpe.planning.measure import measure_in_process, start_scenarios

    two_ranks = start_scenarios(TWO_RANKS, 2, tmp_path_factory.mktemp("plan_measure"))
    return measure_in_process(ONE_RANK), two_ranks()


@pytest.fixture(scope="module")
def one_rank_results(measured):
    return measured[0]


@pytest.fixture(scope="module")
def two_rank_results(measured):
    return measured[1]


@pytest.mark.parametrize("index", range(len(ONE_RANK)), ids=[_id(p) for p in ONE_RANK])
def test_bytes_match_a_built_model_on_one_rank(one_rank_results, index):
    result = one_rank_results[index]
    for component in COMPONENTS:
        assert result["measured"][component] == result["planned"][component], (component, result)
    assert result["measured"]["activations"] > 0 and result["measured"]["optimizer"] > 0


@pytest.mark.parametrize("index", range(len(TWO_RANKS)), ids=[_id(p) for p in TWO_RANKS])
def test_bytes_match_built_models_on_two_ranks(two_rank_results, index):
    for result in two_rank_results[index]:
        for component in COMPONENTS:
            assert result["measured"][component] == result["planned"][component], (component, result)


def test_layouts_change_what_each_rank_holds(one_rank_results, two_rank_results):
    """The checks above compare like with like; these say the layouts really shard what they should."""
    fp32_full, bf16_dist = one_rank_results[1]["measured"], one_rank_results[2]["measured"]
    assert fp32_full["optimizer"] == 2 * fp32_full["weights"] + 4 * 15  # Adam moments + 15 step counters, no master
    assert bf16_dist["optimizer"] > 5 * bf16_dist["weights"]  # fp32 master + moments for bf16 weights
    tp_sp, cp, dp = (two_rank_results[i] for i in range(3))
    assert tp_sp[0]["measured"]["weights"] < 0.6 * bf16_dist["weights"]
    assert dp[0]["measured"]["optimizer"] + dp[1]["measured"]["optimizer"] == bf16_dist["optimizer"]
    assert cp[0]["measured"]["activations"] != cp[1]["measured"]["activations"]  # rank-dependent CPU masks


def test_distributed_optimizer_shards_over_data_and_context_parallel_ranks():
    model = PRESETS["llama2-7b"]
    work = Workload(seq_length=32768, global_batch=8)
    plain = model_state(model, Layout(tp=8, cp=4, dp=2), work, 0)
    dist = model_state(model, Layout(tp=8, cp=4, dp=2, dist_opt=True), work, 0)
    assert plain.optimizer == plain.params * 12
    assert dist.optimizer == pytest.approx(plain.optimizer / 8, rel=1e-3)  # DP x CP = 8 shards
    assert dist.grads >= plain.grads and dist.grads % (4 * 128) == 0
    layout = buffer_layout(chunk_parameters(model, Layout(tp=8), 0), dp_cp=24, dist_opt=True, bucket_size=None)
    assert layout.numel % 24 == 0 and all(start % 64 == 0 for _, start, _, _ in layout.ranges)


def _plan(**layout) -> Plan:
    return Plan(PRESETS["llama2-7b"], Layout(**layout), Workload(seq_length=131072, global_batch=32))


def test_fused_rope_fp8_recompute_and_cp_move_memory_the_right_way():
    gpu = gpu_named("h100")

    def act(plan):
        stage = plan_memory(plan)[0]
        return sum(i.bytes for i in stage.items if i.group == "activations"), stage

    base_act, base = act(_plan(tp=8, cp=4, sp=True, dist_opt=True))
    unfused_act, unfused = act(replace(_plan(tp=8, cp=4, sp=True, dist_opt=True),
                                       workload=Workload(seq_length=131072, global_batch=32, rope_kernel="unfused")))
    assert unfused_act - base_act == pytest.approx(32 * 2 * 2 * 32768 * 128 * 8)  # cos+sin, q and k heads, 32 layers
    assert any(i.name == "rotary angle table" for i in unfused.items)
    assert not any(i.name == "rotary angle table" for i in base.items)
    fp8 = replace(_plan(tp=8, cp=4, sp=True, dist_opt=True),
                  workload=Workload(seq_length=131072, global_batch=32, fp8="hybrid"))
    fp8_act, fp8_stage = act(fp8)
    assert fp8_act < base_act and fp8_stage.sum("model state") > base.sum("model state")
    full_act, _ = act(_plan(tp=8, cp=4, sp=True, dist_opt=True, **FULL))
    assert full_act < 0.2 * base_act
    cp8_act, _ = act(_plan(tp=8, cp=8, sp=True, dist_opt=True))
    assert cp8_act == pytest.approx(base_act / 2, rel=0.02)
    assert evaluate(_plan(tp=8, cp=4, sp=True, dist_opt=True), gpu).fits
    assert not evaluate(_plan(tp=1), gpu).fits


def test_search_ranks_fitting_layouts_and_rejects_the_rest_with_reasons():
    gpu = gpu_named("h100", memory_gib=40)
    result = search(_plan(), 16, gpu, Assumptions())
    assert result.fitting and result.rejected
    speeds = [e.time.tokens_per_s_per_gpu for e in result.fitting]
    assert speeds == sorted(speeds, reverse=True)
    assert all(e.peak.total <= gpu.memory_bytes for e in result.fitting)
    oom = [e for e in result.rejected if e.reason.startswith("out of memory by")]
    assert oom and all(e.peak.total > gpu.memory_bytes for e in oom)
    short = -oom[0].headroom / GIB
    assert f"out of memory by {short:.1f} GiB" in oom[0].reason
    assert len(result.fitting) + len(result.rejected) == result.searched
    assert all(e.plan.layout.gpus == 16 for e in result.fitting)


def test_search_rejects_layouts_the_model_cannot_take():
    odd = ModelShape(4, 384, 1024, 6, 6, 64, 1000, name="odd")  # 6 heads, vocabulary 1000
    result = search(Plan(odd, Layout(), Workload(seq_length=4096, global_batch=8)), 8, gpu_named("h100"))
    reasons = {e.plan.layout.tp: e.reason for e in result.rejected if e.plan.layout.tp in (4, 8)}
    assert "num_attention_heads (6) must be divisible by tensor_model_parallel_size (4)" in reasons[4]
    assert {e.plan.layout.tp for e in result.fitting} <= {1, 2}
    with pytest.raises(LayoutError, match="global batch 8 is not divisible"):
        evaluate(Plan(odd, Layout(dp=3), Workload(seq_length=4096, global_batch=8)), gpu_named("h100"))


def test_megatron_lm_formula_as_read():
    """Our restatement of Megatron-LM's formula gives its textbook numbers: 34 s*b*h/TP bytes per layer
    for a GPT shape (f = 4h) with SP and selective recompute, and 18 bytes per parameter."""
    gpt = ModelShape(1, 1024, 4096, 16, 16, 64, 51200)
    plan = Plan(gpt, Layout(tp=2, sp=True, recompute="selective"), Workload(seq_length=2048, global_batch=1))
    no_layers = replace(plan, model=replace(gpt, num_layers=0))
    per_layer = megatron_lm_estimate(plan).activations - megatron_lm_estimate(no_layers).activations
    assert per_layer == pytest.approx(34 * 2048 * 1024 / 2)
    est = megatron_lm_estimate(plan)
    assert est.weight_and_optimizer == pytest.approx(est.parameters_most_loaded * 18)


def _cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, message", [
    (["examples/no_such.yaml"], "does not exist"),
    (["--model", "llama2-7b"], "--model and --seq-length"),
    (["--model", "llama2-7b", "--seq-length", "4096", "--gpus", "0"], "--gpus must be >= 1"),
    (["--model", "llama2-7b", "--seq-length", "4096", "--gpu", "tpu"], "unknown GPU"),
    (["--model", "llama2-7b", "--seq-length", "4096", "--efficiency", "1.5"], "--efficiency must be in"),
    (["--model", "llama2-7b", "--seq-length", "4096", "--tp", "3"], "divisible by tensor_model_parallel_size (3)"),
    (["--model", "llama2-7b", "--seq-length", "4096", "--tp", "8", "--gpus", "12"], "not a multiple of"),
    (["--model", "gpt5", "--seq-length", "4096"], "invalid choice"),
    (["examples/llama2_7b_harpe_128k.yaml", "--tp", "4"], "with a config use overrides"),
    (["examples/llama2_7b_harpe_128k.yaml", "parallel.tensro=4"], "unknown key"),
    (["examples/llama2_7b_harpe_128k.yaml", "stray"], "is not a dotted override"),
    (["examples/llama2_7b_harpe_128k.yaml", "--gpus", "48"], "not a multiple of"),
    (["examples/llama2_7b_harpe_128k_fp8.yaml", "--gpu", "a100"], "has no FP8"),
])
def test_bad_input_exits_2_with_one_message(capsys, monkeypatch, argv, message):
    monkeypatch.chdir(REPO_ROOT)
    code, out, err = _cli(capsys, *argv)
    assert code == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("harpe-plan: error:") and message in lines[0], err
    assert out == ""


def test_plan_of_the_paper_config_as_text_and_json(capsys, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    code, out, _ = _cli(capsys, "examples/llama2_7b_harpe_128k.yaml", "--gpus", "32", "--gpu", "h100")
    assert code == 0
    assert "TP8 CP4 PP1 DP1 SP DO" in out and "verdict   fits" in out and "MFU" in out
    assert "allocated at the peak" in out and "assumptions:" in out
    code, out, _ = _cli(capsys, "examples/llama2_7b_harpe_128k.yaml", "--gpus", "64", "--json")
    data = json.loads(out)
    assert code == 0 and data["fits"] and data["plan"]["layout"]["dp"] == 2
    assert data["time"]["tokens_per_s_per_gpu"] > 0 and data["stages"][0]["items"]


def test_search_json_parses(capsys):
    code, out, _ = _cli(capsys, "--model", "llama2-7b", "--seq-length", "65536", "--gpus", "8", "--gpu", "h200",
                        "--search", "--json", "--top", "3")
    data = json.loads(out)
    assert code == 0 and len(data["fitting"]) == 3 and data["rejected"]
    assert data["searched"] >= len(data["rejected"]) + 3
    assert all("reason" in r for r in data["rejected"])
    code, out, _ = _cli(capsys, "--model", "llama2-7b", "--seq-length", "65536", "--gpus", "8", "--search")
    assert code == 0 and "rejected:" in out and "tok/s/GPU" in out


def test_the_planner_itself_imports_neither_torch_nor_megatron_core():
    code = ("import sys; from megatron_harpe.planning.cli import main; "
            "main(['--model', 'tiny', '--seq-length', '128', '--json']); "
            "bad = [m for m in ('torch', 'megatron.core') if m in sys.modules]; sys.exit(f'imported {bad}' if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
