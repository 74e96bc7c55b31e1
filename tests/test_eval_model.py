"""Evaluation with tiny local models: perplexity against an independent computation (jsonl and megatron
indexed data, truncate and sliding modes), batched generation, megatron checkpoints through the exporter,
and clear errors for bad inputs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from megatron_harpe.evaluation import cli  # noqa: E402
from megatron_harpe.evaluation.model import load_model  # noqa: E402
from tests.data_fixtures import *  # noqa: E402,F401,F403
from tests.eval_fixtures import *  # noqa: E402,F401,F403


# ----------------------------------------------------------------------------- an independent reference


def reference_documents(tokenizer, corpus: str, needed: int, count: int):
    """The first ``count`` documents of the jsonl with >= ``needed`` tokens (BOS + text), cut to ``needed``."""
    docs = []
    with open(corpus) as f:
        for line in f:
            ids = tokenizer(json.loads(line)["text"]).input_ids       # HF adds BOS itself
            if len(ids) >= needed:
                docs.append(ids[:needed])
                if len(docs) == count:
                    break
    return docs


def reference_ppl_truncate(model, docs, length: int) -> float:
    """exp(mean NLL) of tokens 1..L-1 of each document's first L tokens, from full-sequence logits."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in docs:
            x = torch.tensor([ids[:length]])
            logp = torch.log_softmax(model(x).logits[0].double(), dim=-1)
            total += -sum(logp[t - 1, ids[t]].item() for t in range(1, length))
            count += length - 1
    return math.exp(total / count)


def reference_ppl_sliding(model, docs, context: int, stride: int, span: int) -> float:
    """Press et al. written per token: token t is scored by the first window [kS, kS + C) that ends after it,
    i.e. k = max(0, floor((t - C) / S) + 1), from the tokens kS..t-1."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in docs:
            ids = ids[:span]
            cache = {}
            for t in range(1, span):
                k = max(0, (t - context) // stride + 1)
                if k not in cache:
                    begin = k * stride
                    window = torch.tensor([ids[begin:min(begin + context, span)]])
                    cache[k] = (begin, torch.log_softmax(model(window).logits[0].double(), dim=-1))
                begin, logp = cache[k]
                assert t - begin <= context - 1 and (k == 0 or t - begin >= context - stride)
                total += -logp[t - begin - 1, ids[t]].item()
                count += 1
    return math.exp(total / count)


@pytest.fixture(scope="module")
def hf_pair(tiny_model_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


# ----------------------------------------------------------------------------- perplexity


def test_ppl_equals_a_direct_computation(tiny_model_dir, corpus_jsonl, hf_pair, tmp_path, capsys):
    model, tokenizer = hf_pair
    lengths = [64, 200, 512]
    out = tmp_path / "ppl"
    # --batch-tokens 600: documents batched at the short lengths; --logit-chunk via the API below
    code = cli.main(["ppl", "--model", tiny_model_dir, "--data", corpus_jsonl, "--lengths", "64,200,512",
                     "--num-docs", "3", "--output", str(out), "--batch-tokens", "600", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| perplexity |" in printed and "harpe-eval ppl: 9 evaluated, 0 resumed, complete" in printed
    summary = _summary(out)
    docs = reference_documents(tokenizer, corpus_jsonl, max(lengths), 3)
    assert summary["documents"] == {"64": 3, "200": 3, "512": 3}
    for L in lengths:
        assert summary["ppl"][str(L)] == pytest.approx(reference_ppl_truncate(model, docs, L), rel=1e-5)
        assert summary["scored_tokens"][str(L)] == 3 * (L - 1)
    assert summary["average"] == pytest.approx(sum(summary["ppl"].values()) / 3)
    assert (out / "table.md").read_text().startswith("### Perplexity")


def test_ppl_sliding_mode_equals_a_per_token_computation(tiny_model_dir, corpus_jsonl, hf_pair, tmp_path):
    from megatron_harpe.evaluation.commands import run_ppl

    model, tokenizer = hf_pair
    lm = load_model(tiny_model_dir, lazy=True)
    lm.logit_chunk = 37           # the chunked output head must give the full-logits answer
    summary, markdown, _ = run_ppl(lm, tmp_path / "sliding", data=[corpus_jsonl], lengths=[96, 160], window=48,
                                   mode="sliding", span=300, num_docs=2, progress=False)
    docs = reference_documents(tokenizer, corpus_jsonl, 300, 2)
    for L in (96, 160):
        assert summary["ppl"][str(L)] == pytest.approx(reference_ppl_sliding(model, docs, L, 48, 300), rel=1e-5)
        assert summary["scored_tokens"][str(L)] == 2 * 299
    assert "sliding: context L, stride 48, over the first 300 tokens" in markdown


def test_ppl_on_a_megatron_indexed_dataset_equals_jsonl(tiny_model_dir, corpus_jsonl, hf_pair, tmp_path):
    from megatron_harpe.data.indexed import IndexedDatasetWriter
    from megatron_harpe.evaluation.commands import run_ppl

    _, tokenizer = hf_pair
    lm = load_model(tiny_model_dir, lazy=True)
    prefix = str(tmp_path / "data" / "corpus_text_document")
    (tmp_path / "data").mkdir()
    writer = IndexedDatasetWriter(prefix, "uint16")
    with open(corpus_jsonl) as f:   # the text's ids without BOS, with EOD, as harpe-preprocess --append-eod writes
        for line in f:
            writer.add_document(tokenizer(json.loads(line)["text"], add_special_tokens=False).input_ids
                                + [tokenizer.eos_token_id])
    writer.commit()
    from_jsonl, _, _ = run_ppl(lm, tmp_path / "a", data=[corpus_jsonl], lengths=[128, 256], num_docs=3,
                               progress=False)
    from_indexed, _, _ = run_ppl(lm, tmp_path / "b", data=[prefix + ".bin"], lengths=[128, 256], num_docs=3,
                                 progress=False)
    for L in ("128", "256"):
        assert from_indexed["ppl"][L] == pytest.approx(from_jsonl["ppl"][L], rel=1e-9)
    header = json.loads((tmp_path / "b" / "results.jsonl").read_text().splitlines()[0])["header"]
    assert header["data"] == [prefix + ".bin"]


def test_ppl_resumes_and_adds_documents(tiny_model_dir, corpus_jsonl, tmp_path, capsys):
    out = tmp_path / "resume"
    args = ["ppl", "--model", tiny_model_dir, "--data", corpus_jsonl, "--lengths", "64,128", "--output", str(out),
            "--no-progress"]
    assert cli.main(args + ["--num-docs", "2", "--max-units", "3"]) == 0
    assert "3 evaluated, 0 resumed, stopped by --max-units" in capsys.readouterr().out
    assert cli.main(args + ["--num-docs", "3"]) == 0
    assert "3 evaluated, 3 resumed, complete" in capsys.readouterr().out
    full = tmp_path / "full"
    assert cli.main(args[:-3] + ["--output", str(full), "--num-docs", "3", "--no-progress"]) == 0
    assert _summary(out)["ppl"] == pytest.approx(_summary(full)["ppl"], rel=1e-12)


# ----------------------------------------------------------------------------- generation


def test_batched_generation_equals_one_by_one(passkey_model_dir):
    from megatron_harpe.evaluation.tasks import passkey_sample

    lm = load_model(passkey_model_dir)
    samples = [passkey_sample(L, d, 0, lm.tokenizer) for L, d in ((128, 0.0), (150, 0.5), (176, 1.0), (140, 0.3))]
    assert len({len(s.ids) for s in samples}) > 1          # different lengths: left padding is exercised
    together = lm.generate([s.ids for s in samples], 12)
    alone = [lm.generate([s.ids], 12)[0] for s in samples]
    assert together == alone
    assert samples[0].answers[0] in alone[0]               # the trained model retrieves an in-distribution key


# ----------------------------------------------------------------------------- megatron checkpoints


def test_megatron_checkpoint_is_evaluated_through_the_exporter(tiny_model_dir, corpus_jsonl, hf_pair, tmp_path,
                                                                capsys):
    """A HARPE megatron checkpoint (two K/V groups, bases 1e4 and 1e6): --model exports it (trust_remote_code
    modeling) and the perplexity equals one computed from megatron-core's own logits."""
    from megatron_harpe.backends import setup_backend

    setup_backend()
    from megatron_harpe.convert import convert_hf_to_megatron
    from megatron_harpe.convert.megatron_io import build_full_model, megatron_logits, open_checkpoint, \
        single_process_world
    from megatron_harpe.models.checkpoint import load_model as load_megatron
    from megatron_harpe.config.model import PositionEmbeddingConfig

    _, tokenizer = hf_pair
    ckpt = tmp_path / "mg_harpe"
    convert_hf_to_megatron(tiny_model_dir, ckpt, position=PositionEmbeddingConfig(kind="harpe", bases=[1e4, 1e6]),
                           show_progress=False)
    out = tmp_path / "ppl"
    assert cli.main(["ppl", "--model", str(ckpt), "--data", corpus_jsonl, "--lengths", "64,256", "--num-docs", "2",
                     "--output", str(out), "--no-progress"]) == 0
    assert "exporting it to Hugging Face" in capsys.readouterr().err
    summary = _summary(out)
    assert summary["model_info"]["model_type"] == "harpe_llama" and summary["model_info"]["harpe_bases"] == [1e4, 1e6]
    docs = reference_documents(tokenizer, corpus_jsonl, 256, 2)
    opened = open_checkpoint(ckpt)
    with single_process_world():
        model = build_full_model(opened.model_cfg, torch.float32)
        load_megatron([model], opened.model_cfg, opened.path)
        for L in (64, 256):
            total = 0.0
            for ids in docs:
                logits = megatron_logits(model, torch.tensor([ids[:L]]))[0].double()
                logp = torch.log_softmax(logits[:, :len(tokenizer)], dim=-1)
                total += -sum(logp[t - 1, ids[t]].item() for t in range(1, L))
            assert summary["ppl"][str(L)] == pytest.approx(math.exp(total / (2 * (L - 1))), rel=1e-4)


# ----------------------------------------------------------------------------- bad inputs


def _error(capsys, argv) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    return err


def test_bad_inputs_give_clear_errors(tiny_model_dir, corpus_jsonl, tmp_path, capsys, monkeypatch):
    out = ["--output", str(tmp_path / "out"), "--no-progress"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"--model {empty} has no config.json: not a Hugging Face model directory" in \
        _error(capsys, ["niah", "--model", str(empty), *out])
    assert "--model /nonexistent/model does not exist" in \
        _error(capsys, ["niah", "--model", "/nonexistent/model", *out])

    megatron = tmp_path / "run" / "checkpoints"
    (megatron / "iter_0000010").mkdir(parents=True)
    (megatron / "iter_0000010" / "metadata.json").write_text("{}")
    (megatron / "latest").write_text("iter_0000010\n")
    import megatron_harpe.evaluation.model as model_mod

    monkeypatch.setattr(model_mod, "exporter_available", lambda: False)
    err = _error(capsys, ["passkey", "--model", str(tmp_path / "run"), *out])
    assert "is a megatron checkpoint and this installation has no exporter" in err
    assert f"run `harpe-convert megatron-to-hf --load {tmp_path / 'run'} --out HF_DIR`" in err
    monkeypatch.undo()

    no_tok = tmp_path / "no_tokenizer"
    no_tok.mkdir()
    (no_tok / "config.json").write_text((Path(tiny_model_dir) / "config.json").read_text())
    assert "holds no tokenizer" in _error(capsys, ["passkey", "--model", str(no_tok), *out])

    err = _error(capsys, ["ppl", "--model", tiny_model_dir, "--data", corpus_jsonl, "--lengths", "100k", *out])
    assert "has the 102400 tokens needed (the longest has" in err and "lower --lengths" in err
    bad_key = tmp_path / "bad.jsonl"
    bad_key.write_text(json.dumps({"content": "x " * 5000}) + "\n")
    assert "bad.jsonl:1: no field 'text' (use --text-key)" in \
        _error(capsys, ["ppl", "--model", tiny_model_dir, "--data", str(bad_key), "--lengths", "128", *out])
    assert "--data missing.jsonl not found" in \
        _error(capsys, ["ppl", "--model", tiny_model_dir, "--data", "missing.jsonl", *out])
    assert "--window 300 is larger than the shortest length 256" in \
        _error(capsys, ["ppl", "--model", tiny_model_dir, "--data", corpus_jsonl, "--lengths", "256", "--mode",
                        "sliding", "--window", "300", *out])

    err = _error(capsys, ["niah", "--model", tiny_model_dir, "--tasks", "niah_single_1,niah_magic", *out])
    assert "unknown task 'niah_magic'; known tasks: all, niah_single_1" in err
    err = _error(capsys, ["niah", "--model", tiny_model_dir, "--lengths", "128", *out])
    assert "a length of 128 tokens is too short" in err
    err = _error(capsys, ["needle", "--model", tiny_model_dir, "--haystack", "nope.txt", *out])
    assert "--haystack 'nope.txt': expected essay, repeat or an existing text/jsonl file" in err
    with pytest.raises(SystemExit):
        cli.main(["needle", "--model", tiny_model_dir, "--depths", "0,150"])
    assert "percentages between 0 and 100" in capsys.readouterr().err
    assert not (tmp_path / "out" / "summary.json").exists()   # nothing was evaluated
