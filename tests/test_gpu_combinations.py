"""GPU combinations that Transformer Engine or megatron-core cannot run, refused or made to work before launch
(docs/gpu.md, "Combinations"). Each test fails on the code as it was before the rule: the combination was
accepted and would have crashed, or run wrong, at the first step on a GPU."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from megatron_harpe.backends import setup_backend

setup_backend()

from megatron_harpe.config.model import ModelConfig, PositionEmbeddingConfig  # noqa: E402
from megatron_harpe.convert.megatron_io import single_process_world  # noqa: E402
from megatron_harpe.models.provider import build_model  # noqa: E402
from megatron_harpe.models.transformer_config import (apex_wgrad_fusion_available,  # noqa: E402
                                                      build_transformer_config, fusion_settings)


_REPO = Path(__file__).resolve().parents[1]
FP8_7B = str(_REPO / "examples" / "llama2_7b_harpe_128k_fp8.yaml")  # TP8 CP4 SP, FP8 attention, p2p, head dim 128


def _model() -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                       vocab_size=128, max_position_embeddings=64,
                       position=PositionEmbeddingConfig(kind="harpe", bases=[1e4, 1e6]))


# ----------------------------------------------------------------------------- finding 4
def test_gradient_accumulation_fusion_only_with_apex_wgrad_extension():
    """GPTModel's output layer is megatron-core's own ColumnParallelLinear, which refuses to be built with
    gradient_accumulation_fusion when apex's fused_weight_gradient_mlp_cuda is missing (core_v0.16.1
    tensor_parallel/layers.py:924, 0.19.2 :1070) - the case of every install that gets TE from PyPI without apex.
    The fusion was switched on by CUDA + TE alone; now it also needs the extension. Built here on the CPU with
    the flags a GPU node without apex gets (the extension is not installed here either)."""
    assert not apex_wgrad_fusion_available()
    model_cfg = _model()
    gpu_without_apex = fusion_settings(model_cfg, cuda=True, te=True, kernel="unfused", apex_wgrad=False)
    assert gpu_without_apex["gradient_accumulation_fusion"] is False
    cpu_safe = {k: v for k, v in gpu_without_apex.items() if k not in ("bias_activation_fusion",
                                                                       "bias_dropout_fusion",
                                                                       "cross_entropy_loss_fusion")}
    with single_process_world():
        model = build_model(model_cfg, build_transformer_config(model_cfg, fusions={
            **fusion_settings(model_cfg, cuda=False, te=False), **cpu_safe}))
        assert model.output_layer.gradient_accumulation_fusion is False
        # the rule as it was (CUDA and TE): megatron-core refuses to build the model
        old_rule = {**fusion_settings(model_cfg, cuda=False, te=False), "gradient_accumulation_fusion": True}
        with pytest.raises(RuntimeError, match="fused_weight_gradient_mlp_cuda"):
            build_model(model_cfg, build_transformer_config(model_cfg, fusions=old_rule))
    with_apex = fusion_settings(model_cfg, cuda=True, te=True, kernel="unfused", apex_wgrad=True)
    assert with_apex["gradient_accumulation_fusion"] is True


# ----------------------------------------------------------------------------- finding 1
def _validate(*overrides, world=4):
    from megatron_harpe.config.loader import load_config
    from megatron_harpe.config.validate import validate_config

    validate_config(load_config(TINY, list(overrides)), world_size=world)


TINY = "examples/tiny/harpe.yaml"


@pytest.mark.parametrize("overrides, message", [
    (["parallel.context=4", "parallel.cp_comm_type=a2a+p2p"], "needs parallel.hierarchical_context_sizes"),
    (["parallel.context=4", "parallel.cp_comm_type=a2a+p2p", "parallel.hierarchical_context_sizes=[4,2]"],
     "product is parallel.context"),
    (["parallel.context=4", "parallel.cp_comm_type=p2p", "parallel.hierarchical_context_sizes=[2,2]"],
     "used only with parallel.cp_comm_type=a2a\\+p2p"),
])
def test_a2a_p2p_without_its_two_levels_is_refused(overrides, message, monkeypatch):
    """Before: a2a+p2p was accepted and the trainer never passed hierarchical sizes to megatron-core, whose TE
    attention then hands TE cp_group=None (get_hierarchical_context_parallel_groups(check_initialized=False),
    extensions/transformer_engine.py:1248 in core_v0.16.1): every rank attends within its own chunks only."""
    from megatron_harpe.config.loader import ConfigError

    monkeypatch.chdir(_REPO)
    with pytest.raises(ConfigError, match=message):
        _validate(*overrides)


def test_a2a_p2p_builds_the_hierarchical_groups_te_receives(tmp_path, monkeypatch):
    """With the sizes, the trainer's process-group set-up gives megatron-core the two levels: on 4 gloo ranks
    at CP=4 = a2a 2 x p2p 2, each rank's hierarchical groups are its a2a pair and its p2p pair - what megatron-core's
    TE attention passes to TE - and the transformer config carries the sizes."""
    from tests.launch import run_workers

    monkeypatch.chdir(_REPO)
    _validate("parallel.context=4", "parallel.cp_comm_type=a2a+p2p", "parallel.hierarchical_context_sizes=[2,2]")
    ranks = run_workers(_REPO / "tests" / "workers" / "combinations_worker.py", 4, tmp_path, "--", TINY,
                        f"run_dir={tmp_path / 'run'}", "parallel.context=4", "parallel.cp_comm_type=a2a+p2p",
                        "parallel.hierarchical_context_sizes=[2,2]", "data.global_batch_size=1",
                        timeout=300)
    expected = {0: [[0, 1], [0, 2]], 1: [[0, 1], [1, 3]], 2: [[2, 3], [0, 2]], 3: [[2, 3], [1, 3]]}
    for r in ranks:
        assert r["cp_group"] == [0, 1, 2, 3]
        assert r["hierarchical_groups"] == expected[r["rank"]], r
        assert r["config_hierarchical_sizes"] == [2, 2] and r["config_cp_comm_type"] == "a2a+p2p"


# ----------------------------------------------------------------------------- findings 2, 3, 5, 6
from megatron_harpe.config.combinations import Platform, config_refusals  # noqa: E402
from megatron_harpe.config.loader import ConfigError, load_config  # noqa: E402
from megatron_harpe.training.runtime import Machine, check_runtime  # noqa: E402

H100_TE = {v: Platform(te_version=v, capability=(9, 0), te=True) for v in ("2.9.0", "2.10.0", "2.11.0", "2.18.0")}
B200_TE = Platform(te_version="2.11.0", capability=(10, 0), te=True)


def _refused(path, overrides, platform=Platform()):
    return [r.message() for r in config_refusals(load_config(path, overrides), platform)]


def test_the_paper_fp8_config_runs_on_every_platform_read():
    """The rules refuse combinations, not the project's own 128k FP8 run (TP8 CP4 SP, p2p, head dim 128, delayed)."""
    for platform in [Platform(), *H100_TE.values(), B200_TE]:
        assert _refused(FP8_7B, [], platform) == []


def test_fp8_attention_with_packed_documents_is_refused():
    """Finding 2: TE's FP8 fused attention takes bshd/sbhd only and no other backend trains in FP8 attention: packed
    documents end in 'No dot product attention backend is available' (TE fused_attn.cpp v2.11:255). packing.py
    even pads for FP8, so the combination looked intended - refused at config time, every TE version."""
    found = _refused(FP8_7B, ["data.document_mask=true"])
    assert len(found) == 1 and "fp8.dot_product_attention + data.document_mask" in found[0]
    assert _refused(FP8_7B, ["data.document_mask=true", "fp8.dot_product_attention=false"]) == []


def test_fp8_current_scaling_attention_below_sm100_is_refused_where_the_gpu_is_known():
    """Finding 3: TE disables fused attention for FP8 current scaling ('tensorwise') below sm100 (utils.py v2.11:486):
    refused on an H100 at start-up, accepted on a Blackwell GPU and at config time (the GPU is not known yet)."""
    overrides = ["fp8.recipe=tensorwise"]
    assert _refused(FP8_7B, overrides) == []
    assert any("fp8.recipe=tensorwise" in m for m in _refused(FP8_7B, overrides, H100_TE["2.11.0"]))
    assert _refused(FP8_7B, overrides, B200_TE) == []


def test_fp8_attention_training_below_sm100_needs_head_dim_128():
    """Finding 6a: FP8 attention training on sm90 needs head_dim_qk == head_dim_v == 128 (fused_attn.cpp v2.11:248)."""
    overrides = ["model.hidden_size=2048", "model.num_attention_heads=32", "model.num_query_groups=32"]  # d = 64
    assert any("head dim 128" in m and "64" in m for m in _refused(FP8_7B, overrides, H100_TE["2.11.0"]))
    assert _refused(FP8_7B, overrides, B200_TE) == []
    assert _refused(FP8_7B, overrides + ["fp8.dot_product_attention=false"], H100_TE["2.11.0"]) == []


def test_fp8_gemms_need_tokens_per_rank_divisible_by_8():
    """Finding 6b: TE's assert_dim_for_fp8_exec wants the tokens a rank feeds a linear divisible by 8; probe and
    evaluation lengths were only checked against 2 x CP x TP. A probe length of 64 x 8 x 4 + 64 = 2112 at CP4 x TP8
    with SP leaves 66 tokens per rank."""
    found = _refused(FP8_7B, ["training.probe.lengths=[2112]"])
    assert len(found) == 1 and "training.probe.lengths 2112" in found[0] and "66" in found[0]
    assert _refused(FP8_7B, ["training.probe.lengths=[4096]"]) == []
    assert _refused(FP8_7B, ["training.probe.lengths=[2112]", "fp8.format=null",
                             "fp8.dot_product_attention=false", "fp8.first_last_layers_bf16=false"]) == []


@pytest.mark.parametrize("cp_comm, platform, refused", [
    ("all_gather", H100_TE["2.11.0"], True),   # TE CP v2.11:2842 assert qkv_format != 'thd'
    ("all_gather", H100_TE["2.18.0"], False),  # accepted from 2.18
    ("a2a", H100_TE["2.9.0"], True),           # v2.9:3193
    ("a2a", H100_TE["2.10.0"], False),         # accepted from 2.10
    ("a2a+p2p", H100_TE["2.18.0"], True),      # never (v2.9:3772 .. v2.18:5023)
    ("p2p", H100_TE["2.9.0"], False),          # every version
])
def test_cp_communication_with_packed_documents_follows_the_te_version(cp_comm, platform, refused):
    """Finding 5: which CP communication types TE runs with packed (THD) documents, by TE version."""
    overrides = ["data.document_mask=true", "fp8.dot_product_attention=false", f"parallel.cp_comm_type={cp_comm}"]
    if cp_comm == "a2a+p2p":
        overrides.append("parallel.hierarchical_context_sizes=[2,2]")
    found = _refused(FP8_7B, overrides, platform)
    assert bool(found) == refused, found
    if refused:
        assert all("data.document_mask" in m for m in found)


def test_a2a_needs_heads_divisible_by_cp_at_config_time():
    """Finding 5 (heads): a2a splits each TP rank's query and K/V heads over CP (TE CP v2.11:3365). The tiny model has
    4 query heads and 2 K/V groups: CP=4 a2a cannot split 2 groups, and validation says so before anything starts."""
    from megatron_harpe.config.validate import validate_config

    cfg = load_config(str(_REPO / TINY), ["parallel.context=4", "parallel.cp_comm_type=a2a"])
    with pytest.raises(ConfigError, match="2 K/V heads per TP rank are not divisible by CP 4"):
        validate_config(cfg, world_size=4)
    validate_config(load_config(str(_REPO / TINY), ["parallel.context=2", "parallel.cp_comm_type=a2a"]), world_size=2)


def test_the_machine_check_applies_the_platform_rules():
    """At start-up the installed TE version and the GPU are known: check_runtime refuses what config validation could
    not judge (here FP8 current-scaling attention on an H100), exit 2 with the keys named."""
    cfg = load_config(FP8_7B, ["fp8.recipe=tensorwise"])
    h100 = Machine(cuda=True, te=True, triton=True, capability=(9, 0), te_version="2.11.0")
    with pytest.raises(ConfigError, match="fp8.recipe=tensorwise"):
        check_runtime(cfg, h100)
    check_runtime(cfg, dataclasses.replace(h100, capability=(10, 0)))


def test_the_planner_search_applies_the_same_rules():
    """harpe-plan's layout check asks the same rules for its planned machine (TE spec on an sm90 GPU): an FP8-attention
    plan of a head-dim-64 model is not a layout it offers, and says why; the paper's FP8 plan is."""
    from megatron_harpe.planning.spec import LayoutError, check_plan, plan_from_config

    check_plan(plan_from_config(load_config(FP8_7B, []), gpus=32))
    head_dim_64 = ["model.hidden_size=2048", "model.num_attention_heads=32", "model.num_query_groups=32"]
    with pytest.raises(LayoutError, match="head dim 128"):
        check_plan(plan_from_config(load_config(FP8_7B, head_dim_64), gpus=32))


# ----------------------------------------------------------------------------- finding 7
def test_optimizer_checkpoint_format_follows_the_optimizer_class():
    """fully_reshardable gathers the whole DP group's optimizer state into every rank's host memory at each save
    (distrib_optimizer.py ~1030/~1443 in core_v0.16.1): it is chosen only where torch's AdamW needs it (compat.py,
    reshardable-optimizer-step). TE's/apex's FusedAdam (stood in for by a class that is not torch's Adam: neither
    exists on a CPU) gets dp_reshardable, Megatron-LM's own default. An explicit checkpoint.optimizer_format wins."""
    from megatron_harpe import compat

    class _Chained:  # megatron-core's wrapper: `.optimizer` is the inner optimizer
        def __init__(self, inner):
            self.optimizer = inner

    class FusedAdam(torch.optim.Optimizer):  # the shape of TE's/apex's FusedAdam: not a torch.optim.Adam(W)
        def __init__(self, params):
            super().__init__(params, {"lr": 1e-3})

    params = [torch.nn.Parameter(torch.zeros(3))]
    torch_adamw = _Chained(torch.optim.AdamW(params))
    fused = _Chained(FusedAdam(params))
    fmt = "distrib_optim_sharding_type"
    assert compat.optimizer_checkpoint_metadata(torch_adamw)[fmt] == "fully_reshardable"
    assert compat.optimizer_checkpoint_metadata(fused)[fmt] == "dp_reshardable"
    assert compat.optimizer_checkpoint_metadata(fused, "fully_reshardable")[fmt] == "fully_reshardable"
    from megatron_harpe.cli import InputError
    from megatron_harpe.training.checkpointing import optimizer_format_metadata

    assert optimizer_format_metadata(fused, "auto")[fmt] == "dp_reshardable"
    with pytest.raises(InputError, match="does not resume torch's AdamW exactly"):
        optimizer_format_metadata(torch_adamw, "dp_reshardable")


def test_an_optimizer_format_without_the_distributed_optimizer_is_refused_at_config_time(monkeypatch):
    """A format names how the distributed optimizer saves its state: without it the key would do nothing (or, for
    dp_reshardable with torch's AdamW, stop the run at its first save), so the config is refused before anything."""
    monkeypatch.chdir(_REPO)
    with pytest.raises(ConfigError, match="set parallel.distributed_optimizer=true"):
        _validate("checkpoint.optimizer_format=dp_reshardable", world=2)
    _validate("checkpoint.optimizer_format=fully_reshardable", "parallel.distributed_optimizer=true", world=2)


def test_dp_reshardable_state_is_refused_at_another_tensor_parallel_size(tmp_path):
    """dp_reshardable optimizer state is each rank's flat buffer of its TP/PP/CP shard: megatron-core resumes it at
    another DP size only. Resuming it at another TP is refused by name, with the way out, before megatron-core fails
    deep in the load. (Here: a world of one at TP=1 asked to load state saved at TP=2.)"""
    from megatron_harpe.models.checkpoint import CheckpointError
    from megatron_harpe.training.checkpointing import _check_optimizer_layout

    dp = {"distrib_optim_sharding_type": "dp_reshardable"}
    with single_process_world():
        with pytest.raises(CheckpointError, match="resumes at another DP size only, not at another TP"):
            _check_optimizer_layout(tmp_path, dp, {"world": 2, "tp": 2, "pp": 1, "cp": 1})
        _check_optimizer_layout(tmp_path, dp, {"world": 2, "tp": 1, "pp": 1, "cp": 1})  # another DP only: fine
        _check_optimizer_layout(tmp_path, {"distrib_optim_sharding_type": "fully_reshardable"},
                                {"world": 2, "tp": 2, "pp": 1, "cp": 1})
