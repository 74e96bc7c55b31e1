"""harpe-preflight (megatron_harpe/preflight/): every check passes a clean config and catches a planted fault.

One 4-rank gloo launch (tests/workers/preflight.py) runs the command several times in-process:

- clean runs in four layouts - TP2 x CP2 (HARPE, 4 K/V groups), TP2 (SP) x CP2 with document masking and
  eod_mask_loss on real indexed data, PP2 x DP2, and TP2 x CP2 from a converted Hugging Face Llama (init_from);
- planted faults, each a bug users of other tools met: a CP rank's chunks rotated in the wrong order, one K/V
  group's base swapped, a CP group that does not shard the batch, attention without its CP group (Megatron-Bridge
  #2667), an impossible memory plan, init_from another model than the Hugging Face source.

In-process: the export check against transformers' own RoPE code, with a RoPE scaling the converter drops
(Megatron-Bridge PR #5097) and without; the twin's shape rules; the single-process self-launch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data_fixtures import corpus_jsonl, data_dir, spm_model  # noqa: F401 - session fixtures
from tests.launch import REPO_ROOT, run_workers

TINY = """run_dir: {run_dir}
model:
  num_layers: 4
  hidden_size: 64
  ffn_hidden_size: 128
  num_attention_heads: 4
  num_query_groups: 4
  vocab_size: 1024
  max_position_embeddings: 4096
  position: {{kind: harpe, bases: [10000.0, 100000.0, 1000000.0, 5000000.0]}}
parallel: {{tensor: 2, context: 2}}
data: {{kind: mock, seq_length: 4096, micro_batch_size: 1, global_batch_size: 2}}
training: {{iterations: 10}}
logging: {{progress_bar: false}}
"""

FAULTS = {  # planted fault -> the checks that must fail
    "cp-chunk-order": {"layout parity", "rotary at far positions"},
    "swapped-base": {"layout parity", "rotary at far positions"},
    "cp-not-sharding": {"layout parity", "accounting sanity"},
    "no-cp-group": {"layout parity", "accounting sanity"},
    "other-stack": {"environment"},
}


def _hf_available() -> bool:
    try:
        import safetensors  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("preflight")


@pytest.fixture(scope="module")
def documents(work, spm_model, corpus_jsonl) -> str:  # noqa: F811
    from megatron_harpe.data import preprocess

    assert preprocess.main(["--input", corpus_jsonl, "--tokenizer-type", "sentencepiece", "--tokenizer-model",
                            spm_model, "--output-prefix", str(work / "docs"), "--workers", "0", "--append-eod",
                            "--no-progress"]) == 0
    return str(work / "docs_text_document")


@pytest.fixture(scope="module")
def hf_models(work):
    """Two tiny Hugging Face Llamas (another seed: another model of the same shape), both converted."""
    if not _hf_available():
        return None
    from megatron_harpe.convert.cli import main as convert
    from tests.hf_models import tiny_llama

    out = {}
    for name, seed in (("source", 0), ("other", 1)):
        hf = tiny_llama(work / f"hf_{name}", seed=seed)
        assert convert(["hf-to-megatron", "--hf-dir", str(hf), "--save", str(work / f"ckpt_{name}"),
                        "--no-progress"]) == 0
        out[name] = (hf, work / f"ckpt_{name}")
    return out


@pytest.fixture(scope="module")
def results(work, documents, spm_model, hf_models):  # noqa: F811
    tiny = work / "tiny.yaml"
    tiny.write_text(TINY.format(run_dir=work / "unused"))
    runs = []

    def add(name, *argv, fault=None, config=tiny):
        run_dir = work / "runs" / name
        runs.append({"name": name, "fault": fault, "run_dir": str(run_dir),
                     "argv": ["--config", str(config), f"run_dir={run_dir}", *argv]})

    add("clean")
    for fault in FAULTS:
        add(fault, fault=fault)
    add("impossible-memory", "--gpu-memory-gib", "2")
    add("packed", "parallel.sequence_parallel=true", "data.kind=indexed", f"data.blend=[{documents}]",
        f"data.tokenizer_model={spm_model}", "data.document_mask=true", "data.eod_mask_loss=true",
        "data.seq_length=256", "data.split=100,0,0")
    add("pp2-dp2", "parallel.tensor=1", "parallel.context=1", "parallel.pipeline=2")
    if hf_models is not None:
        (hf, ckpt), (_, other) = hf_models["source"], hf_models["other"]
        model = (ckpt / "model.yaml").read_text().split("\n", 1)[1]
        config = work / "from_hf.yaml"
        config.write_text(model + f"run_dir: {work / 'unused'}\nparallel: {{tensor: 2, context: 2}}\n"
                          f"data: {{kind: mock, seq_length: 128, micro_batch_size: 1, global_batch_size: 2}}\n"
                          f"training: {{iterations: 10, precision: fp32, init_from: {ckpt}}}\n")
        add("init-from-source", "--init-tokens", "256", config=config)  # its HF dir: the conversion's record
        add("init-from-other", f"training.init_from={other}", "--hf-dir", str(hf), "--init-tokens", "256",
            config=config)
    ranks = run_workers("tests/workers/preflight.py", 4, work / "out", "--runs", json.dumps(runs), timeout=900)
    for rank in ranks[1:]:  # every rank reaches the same verdicts
        assert {k: (v["exit"], {c: s["status"] for c, s in v["checks"].items()}) for k, v in rank.items()} == \
            {k: (v["exit"], {c: s["status"] for c, s in v["checks"].items()}) for k, v in ranks[0].items()}
    return ranks[0], work / "runs"


def _failed(run) -> set:
    return {name for name, check in run["checks"].items() if check["status"] == "fail"}


@pytest.mark.parametrize("name", ["clean", "packed", "pp2-dp2"])
def test_clean_layouts_pass_every_check_that_applies(results, name):
    run = results[0][name]
    assert run["exit"] == 0 and not _failed(run), run
    statuses = {c: s["status"] for c, s in run["checks"].items()}
    for check in ("environment", "memory (full run)", "layout parity", "rotary at far positions",
                  "accounting sanity", "memory (twin)", "export keeps positions"):
        assert statuses[check] == "pass", (check, run["checks"][check])
    assert statuses["FP8 vs bf16"] == statuses["initial model"] == "not run"
    parity = run["checks"]["layout parity"]["details"]["passes"]
    target = 256 if name == "packed" else 4096
    assert [p["shift"] for p in parity] == [0, target - 128]  # positions from 0, and ending at the last
    for p in parity:  # far below the tolerance: the margin the faults are measured against
        assert p["loss_rel_error"] < 1e-6 and p["worst_param_rel_error"] < 1e-5, p
        assert p["tokens"] == p["reference_tokens"]


def test_packed_documents_are_compared_one_by_one(results):
    """Document masking: the reference runs each document alone; eod_mask_loss drops the EOD inputs' tokens."""
    run = results[0]["packed"]
    passes = run["checks"]["layout parity"]["details"]["passes"]
    assert passes[0]["tokens"] == 2 * 128 - 2 * 2  # 2 samples of 128 tokens, 2 EOD inputs each (not in the loss)
    shares = run["checks"]["accounting sanity"]["details"]["sequence_share"]
    assert all(s for s in shares["per_rank"]) and shares["expected"]


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_planted_fault_is_caught_by_its_check(results, fault):
    run = results[0][fault]
    assert run["exit"] == 5
    assert FAULTS[fault] <= _failed(run), {k: v["summary"] for k, v in run["checks"].items()}
    assert _failed(run) <= FAULTS[fault] | {"memory (twin)"}, _failed(run)  # the twin measured another model


def test_the_faults_are_named_where_they_are(results):
    runs = results[0]
    rotary = runs["swapped-base"]["checks"]["rotary at far positions"]["summary"]
    assert "head" in rotary and "expected" in rotary and "configured bases" in rotary
    assert "does not shard" in runs["cp-not-sharding"]["checks"]["accounting sanity"]["summary"]
    assert "Megatron-Bridge #2667" in runs["no-cp-group"]["checks"]["accounting sanity"]["summary"]
    assert "gradient of" in runs["cp-chunk-order"]["checks"]["layout parity"]["summary"]


def test_a_rank_on_another_stack_is_named(results):
    summary = results[0]["other-stack"]["checks"]["environment"]["summary"]
    assert summary.startswith("rank 1 runs another stack than rank 0") and "torch" in summary and "-> 2.0.0" in summary


def test_an_impossible_memory_plan_is_refused_with_the_planners_reason(results):
    run = results[0]["impossible-memory"]
    assert run["exit"] == 5 and _failed(run) == {"memory (full run)"}
    summary = run["checks"]["memory (full run)"]["summary"]
    assert "out of memory" in summary and "--search" in summary


def test_the_reports_are_written(results):
    runs, root = results
    md = (root / "clean" / "preflight.md").read_text()
    assert "**PASS:" in md and "| layout parity | PASS |" in md
    report = json.loads((root / "impossible-memory" / "preflight.json").read_text())
    assert report["passed"] is False and report["verdict"].startswith("FAIL: memory (full run)")
    assert not (root / "clean" / "preflight_work").exists()  # the twin's files are removed


def test_initial_model_from_the_converted_source_passes_and_another_model_fails(results):
    runs = results[0]
    if "init-from-source" not in runs:
        pytest.skip("needs transformers and safetensors (pip install 'megatron-harpe[hf]')")
    good, bad = runs["init-from-source"], runs["init-from-other"]
    assert good["exit"] == 0 and good["checks"]["initial model"]["status"] == "pass", good["checks"]["initial model"]
    assert good["checks"]["initial model"]["details"]["rel_diff"] < 2e-5
    assert bad["exit"] == 5 and _failed(bad) == {"initial model"}
    assert "init_from" in bad["checks"]["initial model"]["summary"]


# ----------------------------------------------------------------------------- in-process
def test_export_check_reads_the_config_json_with_transformers(monkeypatch):
    pytest.importorskip("transformers")
    from megatron_harpe.config.model import ModelConfig, PositionEmbeddingConfig
    from megatron_harpe.convert import hf_config
    from megatron_harpe.preflight.init_model import export_check

    for position in (PositionEmbeddingConfig(kind="pi", base=10000.0, interpolation_factor=8.0),
                     PositionEmbeddingConfig(kind="llama3", base=500000.0, llama3_factor=8.0),
                     PositionEmbeddingConfig(kind="rope", base=5e6),
                     PositionEmbeddingConfig(kind="harpe", bases=[1e4, 1e6])):
        model = ModelConfig(num_query_groups=2, position=position)
        result = export_check(model)
        assert result.status == "pass", (position.kind, result.summary)
    records = hf_config.rope_records
    monkeypatch.setattr(hf_config, "rope_records",
                        lambda position: {**records(position), "rope_scaling": None,
                                          "rope_parameters": {"rope_type": "default",
                                                              "rope_theta": records(position)["rope_theta"]}})
    dropped = export_check(ModelConfig(position=PositionEmbeddingConfig(kind="pi", base=10000.0,
                                                                        interpolation_factor=8.0)))
    assert dropped.status == "fail" and "drop" in dropped.summary and "8" in dropped.summary


def test_accounting_refuses_an_mfu_above_the_peak(tmp_path):
    """The numbers side of the accounting check: the twin's measured MFU and the planner's predicted one, each
    above 100% on its own, fail it; the sequence share and attention groups of these observations are right."""
    from megatron_harpe.config.loader import load_config
    from megatron_harpe.preflight.accounting import accounting_check
    from megatron_harpe.preflight.layout_run import LayoutRun, Pass, twin_windows
    from megatron_harpe.preflight.twin import make_twin

    config = tmp_path / "tiny.yaml"
    config.write_text(TINY.format(run_dir=tmp_path / "run").replace("tensor: 2, context: 2", "tensor: 1, context: 1"))
    twin = make_twin(load_config(str(config), []), 1, cuda=False, workdir=tmp_path)
    run = LayoutRun(weights="", passes=[Pass(shift=0, loss=1.0, tokens=1, seconds=0.5, grads="")],
                    probes={"sequence_shares": [(twin.seq_length, 1, 64)] * 2, "attention_cp_groups": []})
    windows = twin_windows(twin)
    flops = accounting_check(twin, run, windows, peak_tflops=1e6).details["twin"]["tflops_per_device"]
    assert accounting_check(twin, run, windows, peak_tflops=1e6, predicted={"mfu": 0.4}).status == "pass"
    measured = accounting_check(twin, run, windows, peak_tflops=flops / 2)  # the twin did twice the peak
    assert measured.status == "fail" and "MFU 200% is above the device's peak" in measured.summary
    planned = accounting_check(twin, run, windows, peak_tflops=1e6, predicted={"mfu": 1.3})
    assert planned.status == "fail" and "the planner's full run: MFU 130%" in planned.summary


def test_twin_keeps_what_decides_positions_and_layout():
    from megatron_harpe.config.loader import load_config
    from megatron_harpe.preflight.twin import make_twin

    cfg = load_config(f"{REPO_ROOT}/examples/llama2_7b_harpe_128k.yaml", [])
    twin = make_twin(cfg, 32, cuda=False, workdir=Path("/nonexistent"))
    m, full = twin.model_cfg, cfg.model
    assert (m.num_attention_heads, m.groups, m.head_dim, m.hidden_size) == \
        (full.num_attention_heads, full.groups, full.head_dim, full.hidden_size)
    assert m.position.bases == full.position.bases and len(m.position.bases) == 32
    assert m.num_layers == 2 and twin.target_length == 131072 and twin.far_offset == 131072 - twin.seq_length
    p = twin.cfg.parallel
    assert (p.tensor, p.context, p.sequence_parallel, twin.data_parallel) == (8, 4, True, 1)
    assert twin.seq_length % (2 * 4 * 8) == 0 and twin.seq_length >= 128  # every CP chunk, every SP shard
    assert not p.distributed_optimizer and twin.cfg.training.init_from is None
    assert any("init_from" in note for note in twin.notes)


def test_one_cpu_process_starts_the_ranks_the_layout_needs(work):
    """`harpe-preflight --config C` alone on a CPU starts TP x PP x CP gloo ranks itself."""
    config = work / "self_launch.yaml"
    config.write_text(TINY.format(run_dir=work / "self_launch").replace("tensor: 2, context: 2",
                                                                        "tensor: 1, context: 2"))
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "megatron_harpe.preflight.cli", "--config", str(config),
                           ], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "starting 2 CPU ranks" in proc.stdout and "harpe-preflight: PASS" in proc.stdout
    report = json.loads((work / "self_launch" / "preflight.json").read_text())
    assert report["passed"] and "world size 2" in report["launch"]
