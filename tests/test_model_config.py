"""Model configs: the base set is resolved once into an explicit list, bad configs fail when made
(before any process group exists) with messages that say what to do, and the position record
written with every checkpoint round-trips."""
import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_harpe.config.loader import ConfigError, dump_config, load_config, model_config_from_dict
from megatron_harpe.config.model import ModelConfig, PositionEmbeddingConfig, check_layout
from megatron_harpe.config.position_record import position_from_record, position_record, verify_position_record
from megatron_harpe.models.transformer_config import YarnTransformerConfig, build_transformer_config
from megatron_harpe.rope.bases import PAPER_LLAMA2_7B_BASES, uniform_bases


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def harpe_model(**kw):
    position = PositionEmbeddingConfig(kind="harpe", bases=kw.pop("bases", [1e4, 1e6]))
    return ModelConfig(num_attention_heads=4, num_query_groups=2, position=position, **kw)


@pytest.mark.parametrize("make, message", [
    (lambda: harpe_model(bases=[1e4, 2e4, 3e4]), "has 3 bases but the model has 2 K/V groups"),
    (lambda: ModelConfig(num_attention_heads=4, num_query_groups=3), "must be a multiple of num_query_groups"),
    (lambda: ModelConfig(hidden_size=60, num_attention_heads=4, kv_channels=15), "must be even for RoPE"),
    (lambda: ModelConfig(position=PositionEmbeddingConfig(kind="pi")), "interpolation_factor"),
    (lambda: ModelConfig(position=PositionEmbeddingConfig(kind="yarn", yarn_factor=32)), "original_max_position"),
    (lambda: ModelConfig(position=PositionEmbeddingConfig(kind="alibi")), "position.kind must be one of"),
    (lambda: ModelConfig(position=PositionEmbeddingConfig(kind="harpe")), "needs position.bases"),
    (lambda: PositionEmbeddingConfig(kind="harpe", bases=[1e4], interpolation_factor=4),
     "interpolation_factor applies to position.kind=pi"),
    (lambda: PositionEmbeddingConfig(kind="rope", bases=[1e4]), "position.bases applies to position.kind=harpe"),
    (lambda: PositionEmbeddingConfig(kind="harpe", base=1e4), "HARPE takes position.bases"),
    (lambda: ModelConfig(attention_dropout=1.0), "attention_dropout must be in"),
    (lambda: PositionEmbeddingConfig(kind="llama3"), "llama3_factor >= 1"),
    (lambda: PositionEmbeddingConfig(kind="llama3", llama3_factor=8, llama3_low_freq_factor=4),
     "llama3_low_freq_factor must be > 0 and below"),
    (lambda: PositionEmbeddingConfig(kind="rope", llama3_factor=8), "llama3_factor applies to position.kind=llama3"),
])
def test_bad_model_configs_are_rejected_when_made(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("layout, message", [
    (dict(tensor=4), "num_query_groups \\(2\\) must be divisible by tensor_model_parallel_size"),
    (dict(tensor=8), "num_attention_heads \\(4\\) must be divisible"),
    (dict(context=2, seq_length=30), "divisible by 2 \\* context_parallel_size"),
    (dict(pipeline=3), "num_layers \\(2\\) must be divisible by pipeline_model_parallel_size"),
    (dict(pipeline=2, virtual_pipeline=2), "divisible by pipeline x virtual pipeline"),
])
def test_layouts_that_do_not_divide_are_rejected(layout, message):
    with pytest.raises(ValueError, match=message):
        check_layout(harpe_model(), **layout)
    check_layout(harpe_model(), tensor=2, context=2, seq_length=32)  # and a good one passes


def test_vocabulary_must_split_over_tensor_parallel():
    with pytest.raises(ValueError, match="pad the vocabulary"):
        check_layout(harpe_model(vocab_size=255), tensor=2)


def test_unknown_and_removed_keys_are_named():
    with pytest.raises(ValueError, match="unknown key\\(s\\): model.num_heads;"):
        model_config_from_dict({"num_heads": 4})
    with pytest.raises(ValueError, match="unknown key\\(s\\): model.position.bsae;"):
        model_config_from_dict({"position": {"kind": "rope", "bsae": 1e6}})
    with pytest.raises(ConfigError, match="data.num_workers was removed"):
        load_config(None, ["data.num_workers=4"])
    with pytest.raises(ConfigError, match="checkpoint.save_on_signal was removed"):
        load_config(None, ["checkpoint.save_on_signal=false"])


def test_section_errors_name_the_full_key():
    with pytest.raises(ConfigError, match="^model.position.base must be > 1"):
        load_config(None, ["model.position.base=0.5"])
    with pytest.raises(ConfigError, match="^model.position.bases: the base set has 3 bases"):
        load_config(None, ["model.position.kind=harpe", "model.position.bases=[2,3,4]"])


def test_transformer_config_carries_the_position_scheme_and_dropout():
    harpe = build_transformer_config(harpe_model(hidden_dropout=0.1, attention_dropout=0.05))
    assert type(harpe) is TransformerConfig and not hasattr(harpe, "harpe_bases")  # bases go to the rotary module
    assert harpe.hidden_dropout == 0.1 and harpe.attention_dropout == 0.05
    assert harpe.normalization == "RMSNorm" and harpe.gated_linear_unit and not harpe.add_bias_linear
    assert harpe.num_query_groups == 2 and harpe.kv_channels == 16
    yarn = build_transformer_config(ModelConfig(position=PositionEmbeddingConfig(
        kind="yarn", yarn_factor=32, yarn_original_max_position_embeddings=4096, yarn_beta_fast=16)))
    assert isinstance(yarn, YarnTransformerConfig) and yarn.yarn_rotary_scaling_factor == 32
    assert yarn.yarn_beta_fast == 16
    rope = build_transformer_config(ModelConfig(), params_dtype=torch.bfloat16)
    # YaRN's attention scaling keys off the presence of these fields: plain RoPE must not have them
    assert type(rope) is TransformerConfig and not hasattr(rope, "yarn_rotary_scaling_factor")
    assert rope.bf16
    with pytest.raises(ValueError, match="must be divisible by tensor_model_parallel_size"):
        build_transformer_config(harpe_model(), tensor_parallel=4)


@pytest.mark.parametrize("strategy, expected", [
    ("uniform", [1e6, 3e6, 5e6]),
    ("uniform-desc", [5e6, 3e6, 1e6]),
])
def test_base_strategies_resolve_to_the_list_when_made(strategy, expected):
    model_cfg = ModelConfig(num_attention_heads=3, hidden_size=48,
                            position=PositionEmbeddingConfig(kind="harpe", base_strategy=strategy))
    position = model_cfg.position
    assert position.bases == expected
    # the strategy is recorded beside the list, with the settings it used
    assert (position.base_strategy, position.base_min, position.base_max) == (strategy, 1e6, 5e6)
    assert position.base_stride is None  # uniform takes no stride: not invented


def test_paper_search_and_file_strategies_resolve(tmp_path):
    paper = ModelConfig(num_attention_heads=32, hidden_size=4096,
                        position=PositionEmbeddingConfig(kind="harpe", base_strategy="paper-llama2-7b"))
    assert paper.position.bases == list(PAPER_LLAMA2_7B_BASES)
    searched = ModelConfig(num_attention_heads=8, hidden_size=1024,
                           position=PositionEmbeddingConfig(kind="harpe", base_strategy="peak-valley"))
    assert len(set(searched.position.bases)) == 8 and searched.position.bases[0] == 1e6
    assert searched.position.base_stride == 3e4
    bases_file = tmp_path / "bases.json"
    bases_file.write_text("[20000, 40000]")
    from_file = ModelConfig(num_attention_heads=2, position=PositionEmbeddingConfig(
        kind="harpe", base_strategy="file", bases_file=str(bases_file)))
    assert from_file.position.bases == [20000.0, 40000.0]
    # the saved config still loads after the file is gone: the list is what counts
    bases_file.unlink()
    again = model_config_from_dict(dataclasses.asdict(from_file))
    assert again.position.bases == [20000.0, 40000.0]


def test_saved_config_holds_the_list_and_reloads_identically(tmp_path):
    cfg = load_config(EXAMPLES / "demo_harpe.yaml", ["data.kind=mock"])
    assert cfg.model.position.bases == uniform_bases(1e4, 1e5, 4)
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_config(cfg))
    position = yaml.safe_load(saved.read_text())["model"]["position"]
    assert position["bases"] == [10000.0, 40000.0, 70000.0, 100000.0] and position["base_strategy"] == "uniform"
    assert load_config(saved) == cfg


def test_a_list_and_a_strategy_that_disagree_are_refused():
    with pytest.raises(ValueError, match="disagree"):
        ModelConfig(num_attention_heads=3, hidden_size=48,
                    position=PositionEmbeddingConfig(kind="harpe", base_strategy="uniform", bases=[1e6, 2e6, 4e6]))


def test_position_record_round_trip_and_mismatch():
    saved = position_record(harpe_model())
    assert saved["bases"] == [1e4, 1e6] and saved["kind"] == "harpe"
    assert position_from_record(saved) == harpe_model().position
    verify_position_record(saved, position_record(harpe_model()))
    with pytest.raises(ValueError, match="bases: checkpoint has \\[10000.0, 1000000.0\\], config has "
                                         "\\[10000.0, 2000000.0\\]"):
        verify_position_record(saved, position_record(harpe_model(bases=[1e4, 2e6])))
    with pytest.raises(ValueError, match="kind"):
        verify_position_record(saved, position_record(ModelConfig(num_attention_heads=4, num_query_groups=2)))


def test_position_record_carries_every_yarn_setting():
    yarn = ModelConfig(position=PositionEmbeddingConfig(kind="yarn", yarn_factor=8,
                                                        yarn_original_max_position_embeddings=64, yarn_beta_fast=16))
    record = position_record(yarn)
    assert record["yarn_beta_fast"] == 16 and record["yarn_beta_slow"] == 1.0
    assert position_from_record(record) == yarn.position  # betas come back from the record itself
    other = dataclasses.replace(yarn, position=dataclasses.replace(yarn.position, yarn_beta_fast=32))
    with pytest.raises(ValueError, match="yarn_beta_fast"):
        verify_position_record(record, position_record(other))
    # records written before the betas were stored (version 1) had the defaults
    old = {k: v for k, v in position_record(other).items() if k not in ("yarn_beta_fast", "yarn_beta_slow")}
    old["version"] = 1
    verify_position_record(old, position_record(other))


def test_position_record_carries_llama3_scaling():
    llama3 = ModelConfig(position=PositionEmbeddingConfig(kind="llama3", base=5e5, llama3_factor=8))
    record = position_record(llama3)
    assert position_from_record(record) == llama3.position
    assert llama3.position.describe() == "RoPE base 500000 + Llama-3 scaling x8"
    other = dataclasses.replace(llama3, position=dataclasses.replace(llama3.position, llama3_high_freq_factor=2.0))
    with pytest.raises(ValueError, match="llama3_high_freq_factor"):
        verify_position_record(record, position_record(other))


def test_how_a_base_set_was_made_is_recorded_but_not_compared():
    made = ModelConfig(num_attention_heads=3, hidden_size=48,
                       position=PositionEmbeddingConfig(kind="harpe", base_strategy="uniform"))
    written = ModelConfig(num_attention_heads=3, hidden_size=48,
                          position=PositionEmbeddingConfig(kind="harpe", bases=[1e6, 3e6, 5e6]))
    assert position_record(made)["base_set_origin"] == {"base_strategy": "uniform", "base_min": 1e6, "base_max": 5e6}
    verify_position_record(position_record(made), position_record(written))


def _training_configs():
    """Every example YAML but the harpe-sweep grid files (a top-level `methods:`; tests/test_sweep_grid_file.py)."""
    import yaml

    return sorted(str(p.relative_to(EXAMPLES)) for p in EXAMPLES.rglob("*.yaml")
                  if "methods" not in (yaml.safe_load(p.read_text()) or {}))


@pytest.mark.parametrize("example", _training_configs())
def test_every_example_config_loads_and_validates(example):
    """The shipped configs stay valid as keys change (their data and checkpoints are not here: mock data, and
    no passkey probes, which need the tokenizer)."""
    from megatron_harpe.config.validate import validate_config

    cfg = load_config(EXAMPLES / example, ["data.kind=mock", "data.tokenizer_model=null", "data.eod_token=null",
                                           "training.init_from=null",
                                           "training.probe.lengths=[]"])
    p = cfg.parallel
    validate_config(cfg, world_size=p.tensor * p.pipeline * p.context * 2)
    if cfg.model.position.kind == "harpe":
        assert len(cfg.model.position.bases) == cfg.model.groups
