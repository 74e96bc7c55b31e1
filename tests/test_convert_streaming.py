"""Conversion that streams: memory bounded by about a layer, whatever the number of layers; tensors bit-identical.

- Memory: random Llamas made here with transformers (hidden 256; 2 layers, and 40 layers: ~220 MB of
  fp32 weights) are converted both ways in a fresh process each (convert/memory_probe.py: the
  peak RSS of each direction over the same process's RSS after the imports). The 40-layer model
  may add only a couple of layers' worth over the 2-layer one, and stays far below its own size.
- Bit-identical, against references that do not go through the converters: every tensor of the
  streamed torch_dist checkpoint (read with torch.distributed.checkpoint directly) equals the one
  built from the HF safetensors with mapping.py's layout (fused QKV, [gate; up], zero vocabulary
  rows), in fp32, in bf16 with tied embeddings, and cast (--dtype); the checkpoint, loaded by the
  trainer's init_from loader at TP=2 x PP=2, TP=2 and PP=2 (4 gloo ranks) and saved from there,
  exports to HF files equal to the source bit for bit, like the TP=1 checkpoint itself; the export
  reads one layer at a time (a load per layer, plus the embedding, final norm and output layer).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_harpe.backends import setup_backend

setup_backend()

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


from megatron_harpe.convert import convert_hf_to_megatron, convert_megatron_to_hf  # noqa: E402
from megatron_harpe.convert.hf_checkpoint import HFCheckpoint  # noqa: E402
from megatron_harpe.convert.mapping import fuse_qkv, hf_tensors  # noqa: E402
from megatron_harpe.convert.megatron_io import build_meta_model, open_checkpoint, single_process_world  # noqa: E402
from megatron_harpe.convert.memory_probe import probe  # noqa: E402
from megatron_harpe.convert.streaming_reader import CheckpointTensors  # noqa: E402
from tests.hf_models import hf_state, tiny_llama  # noqa: E402
from tests.launch import run_workers  # noqa: E402

MB = 10**6


def random_llama(directory: Path, *, layers: int, hidden: int = 64, ffn: int = 176, vocab: int = 1000,
                 tie: bool = False, dtype=torch.float32, shard: str = "60KB") -> Path:
    return tiny_llama(directory, dtype=dtype, tie=tie, seed=layers, shard=shard, num_hidden_layers=layers,
                      hidden_size=hidden, intermediate_size=ffn, vocab_size=vocab)


def torch_dist_tensors(directory: Path) -> dict:
    """Every tensor of a torch_dist checkpoint, whole, read with torch.distributed.checkpoint itself."""
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(directory))
    metadata = reader.read_metadata().state_dict_metadata
    state = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
             for key, meta in metadata.items() if hasattr(meta, "size")}
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state


def expected_checkpoint(hf: dict, cfg, dtype: torch.dtype) -> dict:
    """The torch_dist tensors a HF Llama should become: megatron-core's keys, layers stacked on a leading axis."""
    layers = cfg.num_layers

    def stack(fn):
        return torch.stack([fn(f"model.layers.{i}.") for i in range(layers)]).to(dtype)

    def padded(weight):
        return torch.cat([weight, weight.new_zeros(cfg.vocab_size - weight.shape[0], weight.shape[1])]).to(dtype)

    out = {
        "embedding.word_embeddings.weight": padded(hf["model.embed_tokens.weight"]),
        "decoder.final_layernorm.weight": hf["model.norm.weight"].to(dtype),
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight": stack(lambda p: hf[p + "input_layernorm.weight"]),
        "decoder.layers.self_attention.linear_qkv.weight": stack(lambda p: fuse_qkv(
            hf[p + "self_attn.q_proj.weight"], hf[p + "self_attn.k_proj.weight"], hf[p + "self_attn.v_proj.weight"],
            cfg)),
        "decoder.layers.self_attention.linear_proj.weight": stack(lambda p: hf[p + "self_attn.o_proj.weight"]),
        "decoder.layers.mlp.linear_fc1.layer_norm_weight": stack(lambda p: hf[p + "post_attention_layernorm.weight"]),
        "decoder.layers.mlp.linear_fc1.weight": stack(lambda p: torch.cat([hf[p + "mlp.gate_proj.weight"],
                                                                           hf[p + "mlp.up_proj.weight"]])),
        "decoder.layers.mlp.linear_fc2.weight": stack(lambda p: hf[p + "mlp.down_proj.weight"]),
    }
    if not cfg.tie_embeddings:
        out["output_layer.weight"] = padded(hf["lm_head.weight"])
    return out


def assert_same(got: dict, expected: dict):
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("streaming")


# ----------------------------------------------------------------------------- memory
def test_peak_memory_does_not_grow_with_the_number_of_layers(work):
    sizes, growth = {}, {}
    for layers in (2, 40):
        hf = random_llama(work / f"mem{layers}", layers=layers, hidden=256, ffn=1536, vocab=2048, shard="50MB")
        sizes[layers] = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
        result = probe(["hf-to-megatron", "megatron-to-hf"], hf, work / f"mem{layers}_out")
        growth[layers] = {phase: r.above_baseline for phase, r in result.phases.items()}
    reader = HFCheckpoint(work / "mem40")
    layer = sum(torch.Size(reader.shape(n)).numel() * 4 for n in reader.names() if n.startswith("model.layers.0."))
    reader.close()
    report = {layers: {p: f"{g / MB:.1f} MB" for p, g in phases.items()} for layers, phases in growth.items()}
    assert layer > 5 * MB and sizes[40] > 200 * MB, report
    for phase in ("hf-to-megatron", "megatron-to-hf"):
        # 38 more layers (~210 MB more weights) may add about two layers' worth (measured: 4-8 MB) ...
        assert growth[40][phase] - growth[2][phase] < 2 * layer + 16 * MB, (phase, report)
        # ... and the peak stays far below the model's size (measured: 25-40 MB for 220 MB)
        assert growth[40][phase] < sizes[40] / 3, (phase, report)


# ----------------------------------------------------------------------------- bit-identical
@pytest.fixture(scope="module")
def gqa(work) -> Path:
    """fp32, GQA (4 heads, 2 K/V groups), 4 layers, untied, in many small HF shards."""
    return random_llama(work / "gqa", layers=4)


@pytest.fixture(scope="module")
def streamed(work, gqa) -> Path:
    ckpt = work / "gqa_megatron"
    convert_hf_to_megatron(gqa, ckpt, tp=2, pp=2, make_vocab_size_divisible_by=128, show_progress=False)
    return ckpt


def test_streamed_checkpoint_holds_exactly_the_hf_tensors(streamed, gqa):
    cfg = open_checkpoint(streamed).model_cfg
    assert cfg.vocab_size == 1024
    assert_same(torch_dist_tensors(streamed), expected_checkpoint(hf_state(gqa), cfg, torch.float32))


@pytest.mark.parametrize("dtype,expected_dtype", [("auto", torch.bfloat16), ("fp32", torch.float32)])
def test_bf16_tied_and_cast_checkpoints(work, dtype, expected_dtype):
    hf = work / "tied_bf16"
    if not hf.exists():
        random_llama(hf, layers=2, tie=True, dtype=torch.bfloat16)
    ckpt = work / f"tied_{dtype}"
    convert_hf_to_megatron(hf, ckpt, dtype=dtype, show_progress=False)
    cfg = open_checkpoint(ckpt).model_cfg
    assert cfg.tie_embeddings
    assert_same(torch_dist_tensors(ckpt), expected_checkpoint(hf_state(hf), cfg, expected_dtype))
    back = work / f"tied_{dtype}_hf"
    convert_megatron_to_hf(ckpt, back, dtype="bf16", show_progress=False)
    original = {k: v for k, v in hf_state(hf).items() if k != "lm_head.weight"}
    assert_same(hf_state(back), original)


def test_export_reads_one_layer_at_a_time(streamed, gqa):
    opened = open_checkpoint(streamed)
    cfg = opened.model_cfg
    with single_process_world():
        weights = CheckpointTensors(opened.path, build_meta_model(cfg, torch.float32), torch.float32, cfg)
        exported = dict((name, t.clone()) for name, t in hf_tensors(weights, cfg, 1000))
    assert weights.loads == cfg.num_layers + 3  # each layer once, then embedding, final norm, output layer
    assert_same(exported, hf_state(gqa))


def test_layouts_saved_by_the_trainer_export_bit_identical(streamed, gqa, work):
    out = work / "layouts"
    results = run_workers("tests/workers/convert_streaming.py", 4, out, "--ckpt", str(streamed))
    assert results[0]["tp2_pp2"] == {"local_layers": 2, "qkv_rows": 64}  # one K/V group (2 q + k + v heads)
    assert results[0]["tp2"]["local_layers"] == 4 and results[0]["pp2"]["qkv_rows"] == 128
    original = hf_state(gqa)
    for name in ("tp2_pp2", "tp2", "pp2", None):
        source = out / name if name else streamed
        exported = work / f"exported_{name or 'tp1'}"
        summary = convert_megatron_to_hf(source, exported, max_shard_size="100KB", show_progress=False)
        assert summary.shards > 1 and (exported / "model.safetensors.index.json").is_file()
        assert_same(hf_state(exported), original)
        index = json.loads((exported / "model.safetensors.index.json").read_text())
        assert sorted(index["weight_map"]) == sorted(original)
