"""End to end on a tiny model trained here (tests/eval_fixtures.py): the CLI's passkey, needle and NiaH runs
produce their tables and heatmaps; an interrupted sweep continues where it stopped; runs compare in one table;
the demo's evaluation step."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from megatron_harpe.evaluation import cli  # noqa: E402
from tests.data_fixtures import *  # noqa: E402,F401,F403
from tests.eval_fixtures import *  # noqa: E402,F401,F403


def _records(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()[1:]]


def _png_size(path: Path) -> tuple:
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = mpimg.imread(str(path))
    return image.shape[1], image.shape[0]


def test_passkey_needle_and_niah_runs_write_tables_and_heatmaps(passkey_model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    common = ["--model", passkey_model_dir, "--no-progress", "--name", "tiny-passkey"]
    assert cli.main(["passkey", *common, "--lengths", "128,176,256", "--depths", "0,50,100", "--samples", "2",
                     "--output", str(out / "passkey")]) == 0
    printed = capsys.readouterr().out
    assert "### Passkey retrieval (% retrieved) — tiny-passkey, 2 sample(s) per cell" in printed
    assert "| depth \\ length | 128 | 176 | 256 |" in printed and "harpe-eval passkey: 18 evaluated" in printed
    summary = json.loads((out / "passkey" / "summary.json").read_text())
    assert summary["per_length"]["128"] >= 50.0        # in its training range the model retrieves the key
    assert set(summary["grid"]) == {"0%", "50%", "100%"} and summary["complete"]
    assert _png_size(out / "passkey" / "heatmap.png")[0] > 300
    for rec in _records(out / "passkey" / "results.jsonl"):
        assert rec["prompt_tokens"] + 16 <= rec["length"] and rec["score"] in (0.0, 1.0)
        assert (rec["answers"][0] in rec["prediction"]) == (rec["score"] == 1.0)

    assert cli.main(["needle", *common, "--lengths", "192,256,320", "--depths", "0:100:25",
                     "--output", str(out / "needle")]) == 0
    needle = json.loads((out / "needle" / "summary.json").read_text())
    assert needle["depths"] == [0.0, 0.25, 0.5, 0.75, 1.0] and needle["haystack"] == "essay"
    assert (out / "needle" / "table.md").read_text().count("\n|") >= 8
    width, height = _png_size(out / "needle" / "heatmap.png")
    assert width > 300 and height > 200

    assert cli.main(["niah", *common, "--lengths", "512,640", "--samples", "1", "--output", str(out / "niah")]) == 0
    printed = capsys.readouterr().out
    assert "| task | 512 | 640 | Avg |" in printed and "| **Average** |" in printed
    niah = json.loads((out / "niah" / "summary.json").read_text())
    assert len(niah["tasks"]) == 8 and set(niah["per_length"]) == {"512", "640"}
    assert all(niah["samples"][t] == {"512": 1, "640": 1} for t in niah["tasks"])
    records = _records(out / "niah" / "results.jsonl")
    assert len(records) == 16
    multi = [r for r in records if r["task"] == "niah_multivalue"][0]
    assert len(multi["answers"]) == 4 and multi["score"] in (0.0, 0.25, 0.5, 0.75, 1.0)

    # the runs side by side (rows = runs), as in the paper's tables
    assert cli.main(["report", str(out / "passkey"), str(out / "passkey"), "--names", "a,b",
                     "--out", str(tmp_path / "cmp.md")]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0] == "| model | 128 | 176 | 256 | Avg |" and table.count("\n| ") == 2
    assert (tmp_path / "cmp.md").read_text() == table
    assert cli.main(["report", str(out / "passkey"), str(out / "niah")]) == 2
    assert "cannot put different kinds of results in one table" in capsys.readouterr().err


def test_an_interrupted_sweep_continues_where_it_stopped(passkey_model_dir, tmp_path, capsys, monkeypatch):
    from megatron_harpe.evaluation.model import LoadedModel

    args = ["niah", "--model", passkey_model_dir, "--lengths", "384,448", "--tasks", "niah_single_1,niah_multikey_2",
            "--samples", "2", "--batch-size", "1", "--no-progress"]
    straight = tmp_path / "straight"
    assert cli.main([*args, "--output", str(straight)]) == 0

    original = LoadedModel.generate
    calls = {"n": 0}

    def interrupted(self, prompts, max_new_tokens):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt   # Ctrl-C (or a job's time limit) half-way through the sweep
        return original(self, prompts, max_new_tokens)

    monkeypatch.setattr(LoadedModel, "generate", interrupted)
    resumed = tmp_path / "resumed"
    assert cli.main([*args, "--output", str(resumed)]) == 130
    assert "rerun the same command to continue" in capsys.readouterr().err
    assert len(_records(resumed / "results.jsonl")) == 3
    monkeypatch.setattr(LoadedModel, "generate", original)
    capsys.readouterr()
    assert cli.main([*args, "--output", str(resumed)]) == 0
    assert "5 evaluated, 3 resumed, complete" in capsys.readouterr().out
    key = lambda r: (r["task"], r["length"], r["index"])  # noqa: E731
    assert sorted(_records(resumed / "results.jsonl"), key=key) == sorted(_records(straight / "results.jsonl"), key=key)
    assert json.loads((resumed / "summary.json").read_text())["scores"] == \
        json.loads((straight / "summary.json").read_text())["scores"]
    # other settings never mix into the same file
    assert cli.main([*args, "--output", str(resumed), "--seed", "1"]) == 2
    assert "holds results of other settings (seed: 0 -> 1)" in capsys.readouterr().err


def test_demo_eval_returns_the_tables(passkey_model_dir, corpus_jsonl, tmp_path):
    from megatron_harpe.evaluation import demo_eval

    markdown = demo_eval(passkey_model_dir, "sentencepiece", corpus=corpus_jsonl, out_dir=tmp_path / "demo",
                         lengths=(192, 256), depths=(0.0, 1.0), samples=1, ppl_docs=2)
    assert "### Passkey retrieval" in markdown and "### Needle in a haystack" in markdown
    assert "### Perplexity" in markdown and "| perplexity |" in markdown
    assert (tmp_path / "demo" / "needle" / "heatmap.png").is_file()
    assert (tmp_path / "demo" / "passkey" / "heatmap.png").is_file()
    # a rerun reuses the results
    assert demo_eval(passkey_model_dir, out_dir=tmp_path / "demo", lengths=(192, 256), depths=(0.0, 1.0),
                     samples=1, corpus=corpus_jsonl, ppl_docs=2) == markdown
