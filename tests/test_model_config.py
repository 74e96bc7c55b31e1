"""Model configs: bad layouts fail before any process group exists, with messages that say what to do."""
import pytest
import torch

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_harpe.models.config import (
    HarpeTransformerConfig,
    ModelConfig,
    PositionEmbeddingConfig,
    YarnTransformerConfig,
    build_transformer_config,
    model_config_from_dict,
)
from megatron_harpe.models.metadata import position_metadata, verify_position_metadata


def harpe_model(**kw):
    position = PositionEmbeddingConfig(kind="harpe", bases=kw.pop("bases", [1e4, 1e6]))
    return ModelConfig(num_attention_heads=4, num_query_groups=2, position=position, **kw)


@pytest.mark.parametrize(
    "model, layout, message",
    [
        (harpe_model(bases=[1e4, 2e4, 3e4]), {}, "has 3 bases but the model has 2 K/V groups"),
        (harpe_model(), dict(tensor_parallel=4), "num_query_groups \\(2\\) must be divisible by tensor_model_parallel_size"),
        (harpe_model(), dict(tensor_parallel=8), "num_attention_heads \\(4\\) must be divisible"),
        (harpe_model(), dict(context_parallel=2, seq_length=30), "divisible by 2 \\* context_parallel_size"),
        (harpe_model(vocab_size=255), dict(tensor_parallel=2), "pad the vocabulary"),
        (ModelConfig(position=PositionEmbeddingConfig(kind="pi")), {}, "interpolation_factor"),
        (ModelConfig(position=PositionEmbeddingConfig(kind="yarn", yarn_factor=32)), {}, "original_max_position"),
        (ModelConfig(position=PositionEmbeddingConfig(kind="alibi")), {}, "position.kind must be one of"),
        (ModelConfig(position=PositionEmbeddingConfig(kind="harpe")), {}, "needs position.bases"),
    ],
)
def test_bad_model_configs_are_rejected(model, layout, message):
    with pytest.raises(ValueError, match=message):
        model.validate(**layout)


def test_unknown_keys_are_named():
    with pytest.raises(ValueError, match="unknown key\\(s\\): model.num_heads;"):
        model_config_from_dict({"num_heads": 4})
    with pytest.raises(ValueError, match="unknown key\\(s\\): model.position.bsae;"):
        model_config_from_dict({"position": {"kind": "rope", "bsae": 1e6}})


def test_transformer_config_carries_the_position_scheme():
    harpe = build_transformer_config(harpe_model())
    assert isinstance(harpe, HarpeTransformerConfig) and harpe.harpe_bases == [1e4, 1e6]
    assert harpe.normalization == "RMSNorm" and harpe.gated_linear_unit and not harpe.add_bias_linear
    assert harpe.num_query_groups == 2 and harpe.kv_channels == 16
    yarn = build_transformer_config(ModelConfig(position=PositionEmbeddingConfig(
        kind="yarn", yarn_factor=32, yarn_original_max_position_embeddings=4096)))
    assert isinstance(yarn, YarnTransformerConfig) and yarn.yarn_rotary_scaling_factor == 32
    rope = build_transformer_config(ModelConfig(), params_dtype=torch.bfloat16)
    # YaRN's attention scaling keys off the presence of these fields: plain RoPE must not have them
    assert type(rope) is TransformerConfig and not hasattr(rope, "yarn_rotary_scaling_factor")
    assert rope.bf16


def test_position_metadata_round_trip_and_mismatch():
    saved = position_metadata(harpe_model())
    assert saved["bases"] == [1e4, 1e6] and saved["kind"] == "harpe"
    verify_position_metadata(saved, position_metadata(harpe_model()))
    with pytest.raises(ValueError, match="bases: checkpoint has \\[10000.0, 1000000.0\\], config has \\[10000.0, 2000000.0\\]"):
        verify_position_metadata(saved, position_metadata(harpe_model(bases=[1e4, 2e6])))
    with pytest.raises(ValueError, match="kind"):
        verify_position_metadata(saved, position_metadata(ModelConfig(num_attention_heads=4, num_query_groups=2)))


@pytest.mark.parametrize("strategy, extra, expected", [
    ("uniform", {}, [1e6, 3e6, 5e6]),
    ("uniform-desc", {}, [5e6, 3e6, 1e6]),
])
def test_base_strategies_resolve_from_the_config(strategy, extra, expected):
    position = PositionEmbeddingConfig(kind="harpe", base_strategy=strategy, **extra)
    assert position.resolve_bases(3, 128) == expected


def test_paper_and_search_strategies_resolve(tmp_path):
    paper = PositionEmbeddingConfig(kind="harpe", base_strategy="paper-llama2-7b").resolve_bases(32, 128)
    assert len(paper) == 32 and paper[0] == 1e6 and paper[-1] == 4.54e6
    searched = PositionEmbeddingConfig(kind="harpe", base_strategy="peak-valley").resolve_bases(8, 128)
    assert len(set(searched)) == 8 and searched[0] == 1e6
    bases_file = tmp_path / "bases.json"
    bases_file.write_text("[20000, 40000]")
    from_file = PositionEmbeddingConfig(kind="harpe", base_strategy="file", bases_file=str(bases_file))
    assert from_file.resolve_bases(2, 64) == [20000.0, 40000.0]
