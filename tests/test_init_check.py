"""The step-0 check on a real pretrained model: `harpe-train --check-init HF_DIR` (training/init_check.py) on
SmolLM2-135M-Instruct (the fixture of tests/test_real_model.py: skipped without its package, failed under CI=true).

The journey a researcher starts with: the HF checkpoint converted with `harpe-convert hf-to-megatron`, real English
text (pydoc of a few standard-library modules, split into ~100-token documents) made into megatron data with
`harpe-preprocess` and the model's own tokenizer.json, separated by '<|endoftext|>' (SmolLM2's pretraining separator;
the Instruct tokenizer's EOS '<|im_end|>' ends a chat turn) and named to harpe-train with data.eod_token. Then the
run's first forward at 128 tokens against transformers' loss on the same tokens:

- 3 ranks, one launch (tests/workers/init_check.py): TP=3, HARPE with one base per K/V group (the reference: the
  HF weights in HarpeLlamaForCausalLM), document masking and data.eod_mask_loss (per-document forwards and the EOD
  mask on the reference side); and the faults it must catch: init_from pointing at a randomly initialised model of
  the same shape, data.eod_token left unset (documents end with '<|endoftext|>', the run would mask '<|im_end|>'), a
  model: section with another norm epsilon;
- 4 ranks, one `torchrun -m megatron_harpe.train --check-init` launch: PP=2 x CP=2 without document masking (the
  pipeline's last stage holds the loss, each CP rank chunks r and 3-r of every sample): exit 0, the table, and
  nothing left behind;
- in-process: the command's exit code 5 and its one line for a fault it finds before building anything; and
  harpe-preprocess naming the pretraining separator when given the chat EOS.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_harpe.data.pydoc_text import pydoc_documents
from tests.test_real_model import convert, smollm2  # noqa: F401 - the session's real-model fixture
from tests.launch import REPO_ROOT, free_port, run_workers

SEQ = 128
SEPARATOR = "<|endoftext|>"
BASES = [1e5, 5e5, 2e6]  # HARPE: the model's own base on one K/V group, larger ones on the others


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("init_check")


@pytest.fixture(scope="module")
def checkpoint(smollm2, work) -> Path:
    out = work / "smollm2_megatron"
    convert("hf-to-megatron", "--hf-dir", smollm2, "--save", out)
    return out


@pytest.fixture(scope="module")
def text_data(smollm2, work) -> str:
    from megatron_harpe.data.preprocess import main as preprocess

    source = work / "pydoc.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in pydoc_documents()))
    prefix = work / "data" / "pydoc"
    assert preprocess(["--input", str(source), "--tokenizer-type", "huggingface", "--tokenizer-model",
                       str(smollm2 / "tokenizer.json"), "--output-prefix", str(prefix), "--append-eod",
                       "--eod-token", SEPARATOR, "--workers", "1", "--no-progress"]) == 0
    return f"{prefix}_text_document"


@pytest.fixture(scope="module")
def config(smollm2, work, checkpoint, text_data) -> Path:
    """The run a researcher writes: the conversion's model: section, the data, init_from; fp32 on CPU."""
    model = (checkpoint / "model.yaml").read_text().split("\n", 1)[1]
    path = work / "run.yaml"
    path.write_text(model + f"""run_dir: {work / 'runs' / 'smollm2'}
data:
  kind: indexed
  blend: [{text_data}]
  split: "100,0,0"
  seq_length: {SEQ}
  micro_batch_size: 1
  global_batch_size: 4
  tokenizer_model: {smollm2 / 'tokenizer.json'}
  eod_token: "{SEPARATOR}"
training:
  iterations: 10
  precision: fp32
  init_from: {checkpoint}
checkpoint:
  save_interval: 0
logging:
  progress_bar: false
""")
    return path


TP3_SCENARIOS = {
    "tp3_harpe_documents": ["parallel.tensor=3", "model.position.kind=harpe", f"model.position.bases={BASES}",
                            "model.position.base=null", "data.document_mask=true", "data.eod_mask_loss=true"],
    "random_weights": ["parallel.tensor=3"],  # + training.init_from=<random weights>, added below
    "separator_unset": ["parallel.tensor=3", "data.document_mask=true", "data.eod_token=null"],
    "norm_epsilon": ["parallel.tensor=3", "model.norm_epsilon=1e-6"],
}


@pytest.fixture(scope="module")
def tp3(smollm2, work, checkpoint, config) -> dict:
    random_weights = work / "random_weights"
    scenarios = {k: list(v) for k, v in TP3_SCENARIOS.items()}
    scenarios["random_weights"].append(f"training.init_from={random_weights}")
    results = run_workers("tests/workers/init_check.py", 3, work / "tp3", "--config", str(config), "--hf",
                          str(smollm2), "--scenarios", json.dumps(scenarios), "--random-weights",
                          str(random_weights), "--like", str(checkpoint))
    for rank in results[1:]:  # every rank gets the same verdict
        assert {k: (v["passed"], v["megatron_loss"]) for k, v in rank.items()} == \
            {k: (v["passed"], v["megatron_loss"]) for k, v in results[0].items()}
    return results[0]


def test_tp3_harpe_start_equals_hugging_face_per_document(tp3):
    """The paper's start at TP=3: HARPE with one base per K/V group (each rank holds one group, one base, and a
    third of the vocabulary: the vocabulary-parallel cross entropy), so the reference is the HF weights in
    HarpeLlamaForCausalLM with those bases; 4 samples of 128 tokens of pydoc text. Document masking: the run packs
    each micro-batch (THD), the reference runs every document on its own (positions from 0); data.eod_mask_loss:
    neither counts the positions whose input is '<|endoftext|>'."""
    result = tp3["tp3_harpe_documents"]
    assert result["passed"], result["report"]
    assert "HarpeLlamaForCausalLM" in result["report"] and "HARPE 3 bases [100000, 500000, 2e+06]" in result["report"]
    assert result["rel_diff"] < result["rtol"] == 2e-5
    assert 1.0 < result["megatron_loss"] < 4.0, result["report"]  # a pretrained model's loss, not ln 49152 = 10.8
    assert result["documents"] > 4  # documents of ~100 tokens: most samples hold a boundary
    masked = 4 * SEQ - result["tokens"]
    assert 0 < masked <= result["documents"] and result["tokens"] == result["reference_tokens"]


def test_random_weights_are_caught(tp3):
    result = tp3["random_weights"]
    assert not result["passed"] and result["exit_code"] == 5
    assert abs(result["megatron_loss"] - 10.80) < 0.5, result["report"]  # ln 49152
    assert "near ln(vocab) = 10.80" in result["failure"] and "training.init_from" in result["failure"]


def test_a_separator_the_run_does_not_mask_is_caught_before_any_forward(tp3):
    """The Instruct tokenizer's EOS is '<|im_end|>'; the data ends its documents with '<|endoftext|>'. Without
    data.eod_token, document masking would never split a document: caught from the data, no model built."""
    result = tp3["separator_unset"]
    assert not result["passed"] and result["megatron_loss"] is None and result["seconds"] < 10
    assert "end with '<|endoftext|>' (0), the run's EOD is '<|im_end|>' (2)" in result["failure"]
    assert "data.document_mask" in result["failure"] and "Set data.eod_token" in result["failure"]


def test_a_model_section_unlike_the_checkpoint_is_caught(tp3):
    result = tp3["norm_epsilon"]
    assert not result["passed"] and result["megatron_loss"] is None
    assert "model.norm_epsilon 1e-06 in the run, 1e-05 in" in result["failure"]


def test_check_init_command_at_pp2_cp2(smollm2, config, work):
    """The command as users run it, under torchrun: PP=2 (15 layers a stage; the last one holds the loss) x CP=2
    (each rank holds chunks r and 3-r of every sample, 32 tokens each, and sums its own positions' losses)."""
    run_dir = work / "runs" / "pp2_cp2"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=4",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "megatron_harpe.train",
           "--config", str(config), "--check-init", str(smollm2), f"run_dir={run_dir}", "parallel.pipeline=2",
           "parallel.context=2"]
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    table = proc.stdout[proc.stdout.index("the run's step-0 loss"):]
    assert "TP 1 x PP 2 x CP 2 x DP 1" in table and "PASS" in table, table
    megatron = float(re.search(r"megatron loss\s+([\d.]+)", table).group(1))
    reference = float(re.search(r"reference loss\s+([\d.]+)", table).group(1))
    assert abs(megatron - reference) / reference < 2e-5, table
    assert not (work / "runs" / "pp2_cp2").exists()  # the data cache went into a run_dir the check made


def test_check_init_command_exit_code_and_message(smollm2, config, capsys):
    """A fault found before any model is built, in-process (a world of one): exit 5, the table, one line."""
    from megatron_harpe.train import main

    assert main(["--config", str(config), "--check-init", str(smollm2), "data.eod_token=null",
                 "data.eod_mask_loss=true"]) == 5
    out, err = capsys.readouterr()
    assert "FAIL" in out and "harpe-train: --check-init failed: data: the documents of" in err
    assert "data.eod_mask_loss would act on the tokenizer's EOS (data.eod_token unset)" in err


def test_preprocess_names_the_pretraining_separator_of_a_chat_tokenizer(smollm2, work, capsys):
    """SmolLM2-Instruct's EOS ends a chat turn: --append-eod without --eod-token says which token separates its
    pretraining documents (and keeps the default, Megatron-LM's); with it, the training hint carries data.eod_token."""
    import shlex

    from megatron_harpe.config.loader import load_config
    from megatron_harpe.data.preprocess import main as preprocess

    source = work / "two.jsonl"
    source.write_text('{"text": "One document."}\n{"text": "Another one."}\n')
    common = ["--input", str(source), "--tokenizer-type", "huggingface", "--tokenizer-model",
              str(smollm2 / "tokenizer.json"), "--append-eod", "--workers", "0", "--no-progress"]
    assert preprocess([*common, "--output-prefix", str(work / "chat" / "default")]) == 0
    err = capsys.readouterr().err
    assert "the tokenizer's EOS '<|im_end|>' (2) ends a chat turn" in err
    assert "--eod-token '<|endoftext|>'" in err and "data.eod_token: '<|endoftext|>'" in err
    assert preprocess([*common, "--output-prefix", str(work / "chat" / "separated"), "--eod-token", SEPARATOR]) == 0
    err = capsys.readouterr().err
    assert "ends a chat turn" not in err
    hint = next(line for line in err.splitlines() if "train on it with: harpe-train" in line)
    cfg = load_config(None, shlex.split(hint.split("--config CONFIG.yaml", 1)[1]))
    assert cfg.data.eod_token == SEPARATOR
