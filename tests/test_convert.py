"""harpe-convert: Hugging Face Llama <-> megatron-core checkpoints, and HARPE models exported to HF.

Tiny models are made here with transformers (nothing is downloaded): GQA (4 query heads, 2 K/V
heads), 4 layers, vocabulary 1000 (padded to 1024 on import) with a real sentencepiece
tokenizer; the HARPE export case uses 8 query heads in 4 K/V groups, so that a TP=2 rank holds
two groups (two bases) and each group two query heads. One 4-rank launch (tests/workers/convert_parallel.py) loads the converted checkpoints
into TP=2xPP=2 and TP=2 with the trainer's init_from loader; one harpe-train launch continues
training from a converted checkpoint; the rest runs in this process (a one-process world).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from megatron_harpe.backends import setup_backend

setup_backend()

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from megatron_harpe.convert import ConversionError, convert_hf_to_megatron, convert_megatron_to_hf  # noqa: E402
from megatron_harpe.convert.hf_config import hf_rope_settings, model_config_from_hf, position_from_hf  # noqa: E402
from megatron_harpe.convert.hf_runtime import hf_greedy, load_hf_causal_lm  # noqa: E402
from megatron_harpe.convert.megatron_io import (build_full_model, megatron_logits, open_checkpoint,  # noqa: E402
                                                single_process_world)
from megatron_harpe.convert.tokenizer_files import write_hf_tokenizer  # noqa: E402
from megatron_harpe.config.model import PositionEmbeddingConfig  # noqa: E402
from tests.data_fixtures import *  # noqa: E402,F401,F403
from tests.hf_models import VOCAB, hf_state, tiny_llama  # noqa: E402
from tests.launch import run_workers  # noqa: E402

HARPE_BASES = [10000.0, 100_000.0, 1_000_000.0, 10_000_000.0]  # one per K/V group of hf_gqa


def ids(batch=2, seq=24, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def hf_logits(directory, tokens, dtype=torch.float32):
    model = load_hf_causal_lm(directory, dtype)
    with torch.no_grad():
        return model(tokens).logits


def megatron_checkpoint_logits(ckpt, tokens):
    """Logits of a megatron checkpoint loaded at TP=1 in this process."""
    from megatron_harpe.models.checkpoint import load_model

    opened = open_checkpoint(ckpt)
    with single_process_world():
        model = build_full_model(opened.model_cfg, torch.float32)
        load_model([model], opened.model_cfg, opened.path)
        return megatron_logits(model, tokens)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def hf_llama(work, spm_model) -> Path:
    """A sharded fp32 HF Llama with GQA and the project's sentencepiece tokenizer beside it."""
    directory = tiny_llama(work / "hf_llama")
    write_hf_tokenizer(spm_model, directory, model_max_length=128)
    return directory


@pytest.fixture(scope="module")
def hf_gqa(work, spm_model) -> Path:
    """8 query heads in 4 K/V groups: at TP=2 a rank holds two groups, each with two query heads."""
    directory = tiny_llama(work / "hf_gqa", num_attention_heads=8, num_key_value_heads=4, seed=1)
    write_hf_tokenizer(spm_model, directory, model_max_length=128)
    return directory


@pytest.fixture(scope="module")
def converted(work, hf_llama, hf_gqa) -> dict:
    """hf-to-megatron twice (plain, and the HARPE continual-pretraining start), then the 4-rank worker."""
    llama = work / "mg_llama"
    harpe = work / "mg_harpe"
    convert_hf_to_megatron(hf_llama, llama, tp=2, pp=2, make_vocab_size_divisible_by=128, show_progress=False)
    convert_hf_to_megatron(hf_gqa, harpe, tp=2, make_vocab_size_divisible_by=128, show_progress=False,
                           position=PositionEmbeddingConfig(kind="harpe", bases=HARPE_BASES))
    tokens = ids()
    torch.save({"tokens": tokens, "logits": hf_logits(hf_llama, tokens), "gqa_logits": hf_logits(hf_gqa, tokens)},
               work / "ref.pt")
    out = work / "workers"
    results = run_workers("tests/workers/convert_parallel.py", 4, out, "--llama", str(llama), "--harpe", str(harpe),
                          "--ref", str(work / "ref.pt"))
    return {"llama": llama, "harpe": harpe, "tokens": tokens, "results": results, "out": out}


# ----------------------------------------------------------------------------- HF modeling (no conversion)
def _hf_pair(bases, **config):
    from megatron_harpe.convert.hf_modeling.configuration_harpe_llama import HarpeLlamaConfig
    from megatron_harpe.convert.hf_modeling.modeling_harpe_llama import HarpeLlamaForCausalLM

    torch.manual_seed(0)
    kwargs = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0, **config)
    stock = LlamaForCausalLM(LlamaConfig(**kwargs)).eval()
    harpe = HarpeLlamaForCausalLM(HarpeLlamaConfig(harpe_bases=bases, **kwargs)).eval()
    harpe.load_state_dict(stock.state_dict(), strict=True)
    return stock, harpe


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_hf_harpe_with_equal_bases_is_stock_llama(attn):
    stock, harpe = _hf_pair([10000.0, 10000.0], attn_implementation=attn)
    tokens = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(stock(tokens).logits, harpe(tokens).logits)
    assert torch.equal(hf_greedy(stock, tokens[:1, :5], 12), hf_greedy(harpe, tokens[:1, :5], 12))


def test_hf_harpe_rotates_each_group_with_its_base():
    """Query heads of K/V group g (transformers' repeat_kv order) and k_g use exactly stock RoPE with base b_g."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from megatron_harpe.convert.hf_modeling.modeling_harpe_llama import apply_harpe_rotary_pos_emb

    bases = [10000.0, 500000.0]
    stock, harpe = _hf_pair(bases)
    q, k = torch.randn(1, 4, 10, 16), torch.randn(1, 2, 10, 16)
    positions = torch.arange(10)[None]
    cos, sin = harpe.model.rotary_emb(q, positions)
    assert cos.shape == (1, 2, 10, 16)
    q_rot, k_rot = apply_harpe_rotary_pos_emb(q, k, cos, sin)
    for g, base in enumerate(bases):
        stock.model.rotary_emb.inv_freq = 1.0 / (base ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
        c, s = stock.model.rotary_emb(q, positions)
        q_ref, k_ref = apply_rotary_pos_emb(q[:, 2 * g:2 * g + 2], k[:, g:g + 1], c, s)
        assert torch.equal(q_rot[:, 2 * g:2 * g + 2], q_ref) and torch.equal(k_rot[:, g:g + 1], k_ref)


def test_hf_harpe_refuses_a_base_set_of_the_wrong_size():
    with pytest.raises(ValueError, match="one base per K/V head"):
        _hf_pair([10000.0, 20000.0, 30000.0])


# ----------------------------------------------------------------------------- config records
def test_reads_legacy_and_transformers5_rope_records():
    base = dict(model_type="llama", hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
                vocab_size=100)
    legacy = {**base, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 4.0}}
    modern = {**base, "rope_parameters": {"rope_type": "linear", "rope_theta": 5e5, "factor": 4.0}}
    both = {**legacy, "rope_parameters": modern["rope_parameters"]}
    for config in (legacy, modern, both):
        position = position_from_hf(config)
        assert (position.kind, position.base, position.interpolation_factor) == ("pi", 5e5, 4.0)
    assert position_from_hf({**base, "rope_theta": 5e5}).kind == "rope"  # transformers 4, no scaling
    yarn = {**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0,
                                        "original_max_position_embeddings": 4096}}
    assert position_from_hf(yarn).yarn_original_max_position_embeddings == 4096
    llama31 = {**base, "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                           "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 8192}}
    position = position_from_hf(llama31)
    assert (position.kind, position.base, position.llama3_factor, position.llama3_low_freq_factor,
            position.llama3_high_freq_factor, position.llama3_original_max_position_embeddings) == \
        ("llama3", 5e5, 8.0, 1.0, 4.0, 8192)
    with pytest.raises(ConversionError, match="original_max_position_embeddings"):
        position_from_hf({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ConversionError, match="disagree"):
        hf_rope_settings({**legacy, "rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0}})
    with pytest.raises(ConversionError, match="longrope.*--position-kind"):
        position_from_hf({**base, "rope_scaling": {"rope_type": "longrope", "factor": 8.0}})
    # a Llama-3 layout: GQA, head_dim, tied embeddings
    cfg = model_config_from_hf({**base, "num_key_value_heads": 2, "head_dim": 32, "tie_word_embeddings": True})
    assert (cfg.groups, cfg.head_dim, cfg.kv_channels, cfg.tie_embeddings) == (2, 32, 32, True)


# ----------------------------------------------------------------------------- the parallel layouts
def test_megatron_tp2_logits_equal_hf(converted):
    for result in converted["results"]:
        assert result["tp2"]["max_diff"] < 2e-5, result["tp2"]
        assert result["tp2"]["padded_logits_zero"]


def test_megatron_tp2_pp2_logits_equal_hf(converted):
    last_stage = [r for r in converted["results"] if "tp2_pp2" in r]
    assert len(last_stage) == 2  # the two TP ranks of the last pipeline stage
    for result in last_stage:
        assert result["tp2_pp2"]["max_diff"] < 2e-5, result["tp2_pp2"]
    for result in converted["results"]:
        # each stage holds 2 of the 4 layers; each TP rank one K/V group: (2 q heads + k + v) * 16 rows
        assert result["tp2_pp2_local_layers"] == 2 and result["tp2_pp2_qkv_rows"] == 64


def test_round_trip_through_tp2_pp2_is_bit_identical(converted, hf_llama, work):
    """HF -> megatron -> loaded and re-saved at TP=2 x PP=2 -> HF: the same tensors, the same logits."""
    out = work / "hf_round_trip"
    summary = convert_megatron_to_hf(converted["out"] / "llama_tp2_pp2", out, show_progress=False,
                                     tokenizer=hf_llama, max_shard_size="100KB")
    original, back = hf_state(hf_llama), hf_state(out)
    assert sorted(original) == sorted(back)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    assert summary.shards > 1 and (out / "model.safetensors.index.json").is_file()
    assert summary.parameters == sum(t.numel() for t in original.values())
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == VOCAB
    assert config["rope_theta"] == 10000.0 and config["rope_parameters"]["rope_theta"] == 10000.0
    tokens = converted["tokens"]
    assert torch.equal(hf_logits(out, tokens), hf_logits(hf_llama, tokens))
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()


def test_harpe_export_matches_megatron_tp2(converted, work):
    """A HARPE model (4 K/V groups, 2 query heads each) run and saved at TP=2, exported:
    AutoModelForCausalLM(trust_remote_code) gives the megatron model's logits and its greedy
    continuation. Each TP rank holds two groups, so a wrong group -> base or query-head -> group
    mapping on either side changes the logits."""
    out = work / "hf_harpe"
    convert_megatron_to_hf(converted["out"] / "harpe_tp2", out, show_progress=False, tokenizer=None)
    held = sorted(tuple(r["harpe_local_bases"]) for r in converted["results"])
    assert held == [(1e4, 1e5), (1e4, 1e5), (1e6, 1e7), (1e6, 1e7)]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "harpe_llama" and config["harpe_bases"] == HARPE_BASES
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_harpe_llama.HarpeLlamaForCausalLM"
    assert (out / "modeling_harpe_llama.py").is_file() and (out / "configuration_harpe_llama.py").is_file()
    reference = torch.load(converted["out"] / "harpe_tp2.pt")
    model = load_hf_causal_lm(out)
    assert type(model).__name__ == "HarpeLlamaForCausalLM"
    with torch.no_grad():
        logits = model(converted["tokens"]).logits
    assert (logits - reference["logits"][..., :VOCAB]).abs().max().item() < 2e-5
    # the bases matter: the same weights as one-base Llama give other logits
    assert converted["results"][0]["harpe_vs_llama_max_diff"] > 1e-3
    generated = hf_greedy(model, reference["prompt"], max_new_tokens=8)[0]
    expected = reference["greedy"][0]
    assert len(generated) > len(reference["prompt"][0])
    assert torch.equal(generated, expected[:len(generated)]), (generated, expected)


def test_harpe_with_equal_bases_exports_to_stock_llama_logits(hf_llama, work):
    ckpt, out = work / "mg_equal", work / "hf_equal"
    convert_hf_to_megatron(hf_llama, ckpt, position=PositionEmbeddingConfig(kind="harpe", bases=[1e4, 1e4]),
                           show_progress=False)
    convert_megatron_to_hf(ckpt, out, show_progress=False)
    assert json.loads((out / "config.json").read_text())["model_type"] == "harpe_llama"
    tokens = ids()
    assert torch.equal(hf_logits(out, tokens), hf_logits(hf_llama, tokens))


@pytest.mark.parametrize("position,scaling", [
    (PositionEmbeddingConfig(kind="rope", base=500000.0), None),
    (PositionEmbeddingConfig(kind="pi", base=10000.0, interpolation_factor=4.0), "linear"),
    (PositionEmbeddingConfig(kind="yarn", base=10000.0, yarn_factor=4.0, yarn_original_max_position_embeddings=32),
     "yarn"),
    # an original context of 32 puts this head size's frequencies in all three of Llama 3's bands
    (PositionEmbeddingConfig(kind="llama3", base=10000.0, llama3_factor=8.0, llama3_low_freq_factor=1.0,
                             llama3_high_freq_factor=4.0, llama3_original_max_position_embeddings=32), "llama3"),
])
def test_one_base_schemes_export_as_stock_llama(hf_llama, work, position, scaling):
    """ABF / PI / YaRN models become LlamaForCausalLM configs whose logits equal megatron-core's."""
    ckpt, out = work / f"mg_{position.kind}", work / f"hf_{position.kind}"
    convert_hf_to_megatron(hf_llama, ckpt, position=position, show_progress=False)
    convert_megatron_to_hf(ckpt, out, show_progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert (config["rope_scaling"] or {}).get("rope_type") == scaling
    assert config["rope_parameters"]["rope_type"] == (scaling or "default")
    assert position_from_hf(config) == position  # the config reads back as the same encoding
    tokens = ids(seq=64)  # past YaRN's original length
    diff = (hf_logits(out, tokens) - megatron_checkpoint_logits(ckpt, tokens)[..., :VOCAB]).abs().max().item()
    assert diff < 2e-5, diff


def test_llama31_checkpoint_converts_with_its_rope_scaling(work):
    """A Llama-3.1-shaped checkpoint (rope_type llama3, Llama 3.1's own settings): megatron-core's
    RotaryEmbedding(rope_scaling=True) reproduces Hugging Face's logits, and the export writes the same scaling."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    long = dict(rope_theta=500000.0, max_position_embeddings=2048)
    hf = tiny_llama(work / "hf_llama31", seed=7, rope_scaling=dict(scaling), **long)  # (HF edits the dict)
    ckpt, out = work / "mg_llama31", work / "hf_llama31_back"
    convert_hf_to_megatron(hf, ckpt, show_progress=False)
    tokens = ids(batch=1, seq=2048, seed=3)  # long enough for the wavelengths past 8192 to turn
    reference = hf_logits(hf, tokens)
    unscaled = tiny_llama(work / "hf_llama31_plain", seed=7, **long)
    assert (hf_logits(unscaled, tokens) - reference).abs().max() > 1e-3  # the scaling matters at this length
    diff = (megatron_checkpoint_logits(ckpt, tokens)[..., :VOCAB] - reference).abs().max().item()
    assert diff < 2e-5, diff
    convert_megatron_to_hf(ckpt, out, show_progress=False)
    config = json.loads((out / "config.json").read_text())
    assert {k: config["rope_scaling"][k] for k in scaling} == scaling
    assert torch.equal(hf_logits(out, tokens), reference)


def test_bf16_tied_llama_round_trip(work):
    """A Llama-3.2-style checkpoint (bf16, tied embeddings, one file): bit-identical round trip."""
    hf = tiny_llama(work / "hf_bf16", dtype=torch.bfloat16, tie=True, shard="10GB", seed=5, rope_theta=500000.0)
    ckpt, out = work / "mg_bf16", work / "hf_bf16_back"
    summary = convert_hf_to_megatron(hf, ckpt, show_progress=False)
    assert summary.dtype == "bfloat16"
    convert_megatron_to_hf(ckpt, out, show_progress=False)
    original, back = hf_state(hf), hf_state(out)
    assert "lm_head.weight" not in back and sorted(original) == sorted(back)
    assert all(back[n].dtype == torch.bfloat16 and torch.equal(back[n], t) for n, t in original.items())
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["dtype"] == "bfloat16"
    umask = os.umask(0)
    os.umask(umask)  # safetensors writes 0600; the export is readable as the umask allows, like its other files
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_sentencepiece_tokenizer_exports_with_exact_ids(work, spm_model):
    import sentencepiece as spm

    from transformers import AutoTokenizer

    out = work / "tok"
    out.mkdir()
    info = write_hf_tokenizer(spm_model, out, model_max_length=128)
    assert info.note == "" and (info.bos_token_id, info.eos_token_id) == (1, 2)
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    sp = spm.SentencePieceProcessor(model_file=spm_model)
    for text in ("The passkey is 71432.", " leading space", "two  spaces\tand\nlines", "ünïcödé ☃"):
        assert tok(text, add_special_tokens=False).input_ids == sp.encode(text), text
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    assert tok("hi").input_ids[0] == 1  # BOS added, like Llama


def test_tokenizer_json_exports_with_its_special_tokens(work, hf_tokenizer_dir):
    """A bare Llama-3-like tokenizer.json (no config beside it) gets a tokenizer_config naming BOS/EOS."""
    from transformers import AutoTokenizer

    from megatron_harpe.data.tokenizer import load_tokenizer

    alone = work / "tokjson_src"
    alone.mkdir()
    shutil.copy2(Path(hf_tokenizer_dir) / "tokenizer.json", alone / "tokenizer.json")
    out = work / "tokjson"
    out.mkdir()
    info = write_hf_tokenizer(alone / "tokenizer.json", out, model_max_length=128)
    ours = load_tokenizer("huggingface", str(alone / "tokenizer.json"))
    assert (info.bos_token_id, info.eos_token_id) == (ours.bos, ours.eod)
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tok.eos_token_id == ours.eod and tok.bos_token_id == ours.bos
    text = "The passkey is 71432. Remember it."
    assert tok(text, add_special_tokens=False).input_ids == ours.encode(text)


# ----------------------------------------------------------------------------- bad inputs
def _write_config(directory: Path, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("change,kwargs,message", [
    (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]), {}, "unsupported architecture"),
    (dict(attention_bias=True), {}, "attention_bias"),
    ({}, dict(tp=3), "divisible by tensor_model_parallel_size"),
    ({}, dict(pp=3), "--pp 3.*num_layers \\(4\\) must be divisible by pipeline_model_parallel_size"),
    ({}, dict(position=PositionEmbeddingConfig(kind="harpe", bases=[1e4, 1e5, 1e6])), "3 bases.*2 K/V groups"),
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 5e5, "factor": 8.0}), {}, "--position-kind"),
    (dict(intermediate_size=200), {}, "shape mismatch"),
])
def test_refuses_bad_inputs_clearly(hf_llama, work, change, kwargs, message):
    bad = work / "bad_hf"
    shutil.rmtree(bad, ignore_errors=True)
    shutil.copytree(hf_llama, bad)
    _write_config(bad, **change)
    with pytest.raises(ConversionError, match=message):
        convert_hf_to_megatron(bad, work / "bad_out", show_progress=False, **kwargs)
    assert not (work / "bad_out").exists() and not (work / ".bad_out.incomplete").exists()


def test_refuses_to_overwrite_and_unknown_tensors(hf_llama, work):
    target = work / "exists"
    target.mkdir(exist_ok=True)
    with pytest.raises(ConversionError, match="--overwrite"):
        convert_hf_to_megatron(hf_llama, target, show_progress=False)
    extra = work / "extra_hf"
    shutil.rmtree(extra, ignore_errors=True)
    shutil.copytree(hf_llama, extra)
    safetensors_torch.save_file({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)},
                                str(extra / "extra.safetensors"))
    index = json.loads((extra / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.self_attn.q_proj.bias"] = "extra.safetensors"
    (extra / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match="does not use"):
        convert_hf_to_megatron(extra, work / "extra_out", show_progress=False)


def test_cli(hf_llama, work, capsys):
    from megatron_harpe.convert.cli import main

    ckpt = work / "cli_ckpt"
    assert main(["hf-to-megatron", "--hf-dir", str(hf_llama), "--save", str(ckpt), "--position-kind", "harpe",
                 "--bases", "1e4,5e5", "--tp", "2", "--no-progress", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "harpe-convert hf-to-megatron:" in out and "HARPE 2 bases" in out and " s |" in out
    assert "max |logit diff| vs HF" in out  # HARPE differs from the one-base source by design
    assert "kind: harpe" in (ckpt / "model.yaml").read_text()
    assert main(["megatron-to-hf", "--load", str(ckpt), "--out", str(work / "cli_hf"), "--no-progress"]) == 0
    assert "shard(s)" in capsys.readouterr().out
    assert main(["hf-to-megatron", "--hf-dir", str(hf_llama), "--save", str(ckpt), "--tp", "3"]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["hf-to-megatron", "--hf-dir", str(hf_llama), "--save", str(work / "x"), "--bases", "1e4,1e5"]) == 2
    assert "--bases needs --position-kind" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the trainer in between
@pytest.fixture(scope="module")
def trained_run(converted, work):
    """harpe-train (TP=2, HARPE) started with init_from from the one-base Llama conversion, 2 iterations:
    the continual-pretraining start (weights of a RoPE model, trained on with per-group bases)."""
    run = work / "run"
    results = run_workers("tests/workers/train_worker.py", 2, work / "train_out", "--", "--config",
                          "examples/tiny/harpe.yaml", f"run_dir={run}", f"training.init_from={converted['llama']}",
                          "parallel.tensor=2", "model.num_layers=4", "model.vocab_size=1024", "training.iterations=2")
    assert results[0]["exit_code"] == 0, results[0]["reason"]
    return run


def test_trainer_checkpoint_exports_with_its_run_config(trained_run, hf_llama, work):
    """A run directory (checkpoints/latest, config.yaml) exports without options: architecture from
    config.yaml, bases from the position record, vocabulary and tokenizer from the init_from checkpoint."""
    from megatron_harpe.convert.megatron_io import locate_checkpoint

    ckpt = trained_run / "checkpoints" / "iter_0000002"
    for load in (trained_run, trained_run / "checkpoints", ckpt):  # run dir, its `latest`, one checkpoint
        assert locate_checkpoint(load) == ckpt
    out = work / "hf_trained"
    convert_megatron_to_hf(trained_run, out, show_progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["harpe_bases"] == [10000.0, 200000.0]  # examples/tiny/harpe.yaml, not the converted start
    assert config["vocab_size"] == VOCAB and (out / "tokenizer.json").is_file()
    tokens = ids()
    diff = (hf_logits(out, tokens) - megatron_checkpoint_logits(ckpt, tokens)[..., :VOCAB]).abs().max().item()
    assert diff < 2e-5, diff
    # init_from loaded the converted weights: two small steps later they are still close to them
    start, trained = hf_state(hf_llama)["model.embed_tokens.weight"], hf_state(out)["model.embed_tokens.weight"]
    assert torch.nn.functional.cosine_similarity(start.flatten(), trained.flatten(), dim=0) > 0.9


def test_export_and_generate(trained_run, work, capsys):
    from megatron_harpe.convert import export_and_generate

    result = export_and_generate(trained_run, prompt="The passkey is", max_new_tokens=6, out_dir=work / "demo_hf")
    printed = capsys.readouterr().out
    assert "harpe-convert megatron-to-hf" in printed and "HARPE 2 bases" in printed and "generation" in printed
    assert 1 <= len(result["new_token_ids"]) <= 6 and isinstance(result["completion"], str)
    diff = float(result["summary"].extra["max |logit diff| HF vs megatron"])
    assert diff < 2e-5
