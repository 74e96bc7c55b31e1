"""The GPU production path, as far as it can be shown on CPU: FP8 / CP-comm / recompute / kernel keys and
their checks, the decisions that depend on what is installed (each tested for both answers), the
optimizer-specific resume fix, checkpoints that cross layer specs (`_extra_state`), recompute with GQA
HARPE, and a save under overlap_param_gather holding the current weights."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from megatron_harpe.backends import setup_backend

setup_backend()

from megatron_harpe import compat  # noqa: E402
from megatron_harpe.config.loader import ConfigError, load_config  # noqa: E402
from megatron_harpe.config.model import ModelConfig, PositionEmbeddingConfig  # noqa: E402
from megatron_harpe.config.validate import validate_config  # noqa: E402
from megatron_harpe.models.transformer_config import (build_transformer_config, fp8_settings,  # noqa: E402
                                                      fusion_settings, rope_kernel)
from megatron_harpe.training.runtime import Machine, check_runtime  # noqa: E402
from tests.launch import REPO_ROOT, run_workers  # noqa: E402

TINY = f"{REPO_ROOT}/examples/tiny/harpe.yaml"
BF16 = ["training.precision=bf16"]


def validate(*overrides, world=2):
    validate_config(load_config(TINY, list(overrides)), world_size=world)


# ----------------------------------------------------------------------------- config keys
@pytest.mark.parametrize("overrides", [
    [*BF16, "fp8.format=hybrid"],
    [*BF16, "fp8.format=e4m3", "fp8.recipe=tensorwise", "fp8.dot_product_attention=true"],
    [*BF16, "fp8.format=hybrid", "fp8.dot_product_attention=true", "parallel.context=2", "parallel.cp_comm_type=a2a"],
    [*BF16, "fp8.format=hybrid", "fp8.recipe=blockwise", "fp8.first_last_layers_bf16=true",
     "fp8.num_layers_at_start_in_bf16=0", "fp8.num_layers_at_end_in_bf16=1"],
    ["parallel.context=2", "parallel.cp_comm_type=all_gather"],
    ["training.recompute_granularity=selective", "training.recompute_modules=[core_attn,mlp]"],
    ["training.recompute_granularity=full", "training.recompute_method=block", "training.recompute_num_layers=1"],
    ["model.position.kernel=unfused"],
])
def test_good_gpu_settings_pass(overrides):
    validate(*overrides)


@pytest.mark.parametrize("overrides, message", [
    (["fp8.format=e5m2"], "fp8.format must be one of"),
    ([*BF16, "fp8.format=hybrid", "fp8.recipe=fp4"], "fp8.recipe must be one of"),
    (["fp8.format=hybrid"], "needs training.precision bf16"),  # the tiny config trains in fp32
    (["fp8.dot_product_attention=true"], "need fp8.format"),
    ([*BF16, "fp8.format=hybrid", "fp8.dot_product_attention=true", "fp8.recipe=mxfp8"], "delayed or tensorwise"),
    ([*BF16, "fp8.format=hybrid", "fp8.dot_product_attention=true", "fp8.multi_head_attention=true"],
     "HARPE rotates q and k"),
    ([*BF16, "fp8.format=hybrid", "fp8.multi_head_attention=true"], "needs fp8.dot_product_attention"),
    ([*BF16, "fp8.format=hybrid", "fp8.dot_product_attention=true", "parallel.context=2",
      "parallel.cp_comm_type=all_gather"], "no FP8 path for all_gather"),
    ([*BF16, "fp8.format=hybrid", "fp8.amax_compute_algo=mean"], "amax_compute_algo"),
    ([*BF16, "fp8.format=hybrid", "fp8.first_last_layers_bf16=true"], "must leave"),  # 1 + 1 of 2 layers
    (["parallel.cp_comm_type=ring"], "parallel.cp_comm_type must be one of"),
    (["training.recompute_modules=[mlp]"], "applies to training.recompute_granularity=selective"),
    (["training.recompute_granularity=selective", "training.recompute_modules=[moe]"], "choose from"),
    (["training.recompute_granularity=full", "training.recompute_method=uniform"], "recompute_num_layers >= 1"),
    (["model.position.kernel=turbo"], "position.kernel must be one of"),
])
def test_bad_gpu_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(*overrides)


def test_yarn_has_no_fused_kernel():
    with pytest.raises(ValueError, match="not available for yarn"):
        PositionEmbeddingConfig(kind="yarn", yarn_factor=4, yarn_original_max_position_embeddings=64, kernel="fused")


def test_fp8_settings_reach_the_transformer_config_under_megatron_core_names():
    cfg = load_config(TINY, [*BF16, "fp8.format=hybrid", "fp8.dot_product_attention=true", "fp8.margin=1"])
    tcfg = build_transformer_config(cfg.model, params_dtype=torch.bfloat16, **fp8_settings(cfg.fp8))
    assert (tcfg.fp8, tcfg.fp8_recipe, tcfg.fp8_dot_product_attention, tcfg.fp8_margin) == ("hybrid", "delayed",
                                                                                            True, 1)
    assert tcfg.fp8_amax_history_len == 1024 and tcfg.fp8_amax_compute_algo == "max"
    assert fp8_settings(load_config(TINY).fp8) == {}


# ----------------------------------------------------------------------------- decisions by machine
CPU = Machine(cuda=False, te=False, triton=False, capability=None)
A100 = Machine(cuda=True, te=True, triton=True, capability=(8, 0))
H100 = Machine(cuda=True, te=True, triton=True, capability=(9, 0))
H100_NO_TE = Machine(cuda=True, te=False, triton=True, capability=(9, 0))


@pytest.mark.parametrize("machine, overrides, message", [
    (CPU, [*BF16, "fp8.format=hybrid"], "needs Transformer Engine on a GPU.*no GPU"),
    (H100_NO_TE, [*BF16, "fp8.format=hybrid"], "no Transformer Engine"),
    (A100, [*BF16, "fp8.format=hybrid"], "compute capability >= 8.9"),
    (H100, [*BF16, "fp8.format=hybrid", "fp8.recipe=mxfp8"], "Blackwell"),
    (H100, [*BF16, "fp8.format=hybrid"], None),
    (CPU, ["model.position.kernel=fused"], "needs CUDA and Triton"),
    (H100, ["model.position.kernel=fused"], None),
    (CPU, ["model.position.kind=rope", "model.position.bases=null", "model.position.kernel=fused"],
     "needs Transformer Engine"),
])
def test_runtime_checks_follow_the_machine(machine, overrides, message):
    cfg = load_config(TINY, overrides)
    if message is None:
        check_runtime(cfg, machine)
    else:
        with pytest.raises(ConfigError, match=message):
            check_runtime(cfg, machine)


def test_mfu_peak_follows_fp8():
    assert (H100.peak_tflops(fp8=False), H100.peak_tflops(fp8=True), CPU.peak_tflops(fp8=True)) == (989.0, 1979.0,
                                                                                                    None)


def _model(kind="harpe", kernel="auto"):
    position = (PositionEmbeddingConfig(kind="harpe", bases=[1e4, 1e6], kernel=kernel) if kind == "harpe"
                else PositionEmbeddingConfig(kind=kind, kernel=kernel, interpolation_factor=4 if kind == "pi" else None))
    return ModelConfig(num_attention_heads=4, num_query_groups=2, position=position)


@pytest.mark.parametrize("kind, machine, expected", [
    ("harpe", CPU, "unfused"), ("harpe", H100, "fused"), ("harpe", dataclasses.replace(H100, triton=False), "unfused"),
    ("rope", H100, "fused"), ("rope", H100_NO_TE, "unfused"), ("pi", H100, "fused"), ("rope", CPU, "unfused"),
])
def test_auto_kernel_is_fused_where_available(kind, machine, expected):
    assert rope_kernel(_model(kind), cuda=machine.cuda, te=machine.te, triton=machine.triton) == expected
    assert rope_kernel(_model(kind, "unfused"), cuda=machine.cuda, te=machine.te, triton=machine.triton) == "unfused"


def test_fusions_are_on_where_they_do_not_touch_harpe():
    cpu = fusion_settings(_model(), cuda=False, te=False)
    assert not any(cpu.values())  # CPU: everything off
    harpe = fusion_settings(_model(), cuda=True, te=True, kernel="fused", apex_wgrad=True)
    assert harpe["bias_activation_fusion"] and harpe["bias_dropout_fusion"] and harpe["cross_entropy_loss_fusion"]
    assert harpe["gradient_accumulation_fusion"]
    # TE from PyPI without apex: the output layer (megatron-core's ColumnParallelLinear) could not be built
    assert not fusion_settings(_model(), cuda=True, te=True, kernel="fused")["gradient_accumulation_fusion"]
    assert not harpe["apply_rope_fusion"] and not harpe["fused_single_qkv_rope"]  # HARPE: own kernel, never TE's
    rope = fusion_settings(_model("rope"), cuda=True, te=True, kernel="fused")
    assert rope["apply_rope_fusion"]  # one base: TE's fused RoPE
    no_te = fusion_settings(_model("rope"), cuda=True, te=False, kernel="unfused")
    assert not no_te["gradient_accumulation_fusion"] and not no_te["apply_rope_fusion"]


def test_te_fused_rope_is_refused_for_harpe():
    with pytest.raises(ValueError, match="HARPE's own fused kernel is model.position.kernel=fused"):
        build_transformer_config(_model(), apply_rope_fusion=True)


# ----------------------------------------------------------------------------- optimizer-specific resume fix
def _stepped(optimizer_cls, **kw):
    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))]
    return optimizer_cls(params, lr=0.1, **kw)


class _Chained:  # megatron-core's wrapper shape: `.optimizer` is the torch optimizer
    def __init__(self, inner):
        self.optimizer = inner


def test_adamw_step_fixes_apply_to_torch_adam_only():
    adamw = _Chained(_stepped(torch.optim.AdamW))
    compat.prepare_optimizer_for_loading(adamw)
    assert all("step" in adamw.optimizer.state[p] for p in adamw.optimizer.param_groups[0]["params"])
    # an optimizer that keeps no per-parameter 'step' (TE's/apex's FusedAdam keep it per group) is left alone
    other = _Chained(_stepped(torch.optim.SGD, momentum=0.9))
    compat.prepare_optimizer_for_loading(other)
    assert all("step" not in other.optimizer.state[p] for p in other.optimizer.param_groups[0]["params"])


# ----------------------------------------------------------------------------- checkpoints across specs
def _extra_state_model(model_cfg, tcfg):
    """The local spec whose core attention keeps state outside its parameters, as Transformer Engine's
    attention keeps its FP8 scales in `_extra_state` (the local spec's SDPA attention has none, so a
    checkpoint written on CPU or by the converter lacks the entry)."""
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from megatron_harpe.models.attention import HarpeSelfAttention
    from megatron_harpe.models.norm import RMSNorm
    from megatron_harpe.models.provider import HarpeGPTModel
    from megatron_harpe.models.spec import local_llama_layer_spec
    from megatron_harpe.parallel.core_attention import SDPACoreAttention

    class WithScales(SDPACoreAttention):
        restored = None

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            return MegatronModule.sharded_state_dict(self, prefix, sharded_offsets, metadata)

        def get_extra_state(self):
            return torch.tensor([448.0])

        def set_extra_state(self, state):
            WithScales.restored = state

    layer = local_llama_layer_spec(HarpeSelfAttention)
    attention = dataclasses.replace(layer.submodules.self_attention, submodules=dataclasses.replace(
        layer.submodules.self_attention.submodules, core_attention=WithScales))
    layer = dataclasses.replace(layer, submodules=dataclasses.replace(layer.submodules, self_attention=attention))
    spec = TransformerBlockSubmodules(layer_specs=[layer] * model_cfg.num_layers, layer_norm=RMSNorm)
    model = HarpeGPTModel(config=tcfg, bases=model_cfg.position.bases, transformer_layer_spec=spec,
                          vocab_size=model_cfg.vocab_size, max_sequence_length=64, parallel_output=False)
    return model.eval(), WithScales


def _built(model_cfg):
    from megatron_harpe.models.provider import build_model

    return build_model(model_cfg, build_transformer_config(model_cfg), parallel_output=False).eval()


def test_checkpoints_load_across_specs_with_and_without_extra_state(tmp_path):
    from megatron_harpe.convert.megatron_io import single_process_world
    from megatron_harpe.models.checkpoint import load_model, save_model

    build_full_model = lambda cfg, dtype: _built(cfg)  # noqa: E731  (initialised weights)
    model_cfg = _model()
    tokens = torch.randint(0, model_cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with single_process_world():
        plain = build_full_model(model_cfg, torch.float32)
        save_model([plain], model_cfg, tmp_path / "plain")
        with_scales, cls = _extra_state_model(model_cfg, build_transformer_config(model_cfg))
        load_model([with_scales], model_cfg, tmp_path / "plain")  # init_from a converted/CPU checkpoint into "TE"
        with torch.no_grad():
            assert torch.equal(with_scales(tokens, None, None), plain(tokens, None, None))
        assert cls.restored is None  # the plain checkpoint had none to give
        save_model([with_scales], model_cfg, tmp_path / "scaled")
        again, again_cls = _extra_state_model(model_cfg, build_transformer_config(model_cfg))
        load_model([again], model_cfg, tmp_path / "scaled")  # the scales come back when they were saved
        assert torch.equal(again_cls.restored, torch.tensor([448.0]))
        load_model([build_full_model(model_cfg, torch.float32)], model_cfg, tmp_path / "scaled")  # and are ignored
        # a missing real weight is still an error that names it
        untied = dataclasses.replace(model_cfg, tie_embeddings=True)
        save_model([build_full_model(untied, torch.float32)], untied, tmp_path / "tied")
        with pytest.raises(ValueError, match="lacks 1 entry this model needs.*output_layer.weight"):
            load_model([build_full_model(model_cfg, torch.float32)], model_cfg, tmp_path / "tied")


# ----------------------------------------------------------------------------- recompute with GQA HARPE
def _loss_and_grads(model_cfg, kernel="unfused", **recompute):
    from megatron_harpe.convert.megatron_io import single_process_world
    from megatron_harpe.models.provider import build_model

    with single_process_world():
        torch.manual_seed(0)
        model = build_model(model_cfg, build_transformer_config(model_cfg, **recompute), rope_kernel=kernel)
        tokens = torch.randint(0, model_cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
        loss = model(tokens, None, None, labels=torch.roll(tokens, -1, 1)).float().mean()
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("recompute", [
    dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
    dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
    dict(recompute_granularity="selective", recompute_modules=["mlp"]),
    dict(recompute_granularity="selective", recompute_modules=["core_attn", "mlp"]),
])
def test_recompute_with_gqa_harpe_gives_the_same_loss_and_gradients(recompute):
    """GQA (4 query heads, 2 K/V groups, two bases) with dropout, so the recomputed forward must also
    replay the same random numbers."""
    model_cfg = dataclasses.replace(_model(), num_layers=3, hidden_dropout=0.1, attention_dropout=0.1)
    plain_loss, plain_grads = _loss_and_grads(model_cfg)
    loss, grads = _loss_and_grads(model_cfg, **recompute)
    assert loss == plain_loss
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("recompute", [{}, dict(recompute_granularity="full", recompute_method="uniform",
                                                recompute_num_layers=1)])
def test_fused_kernel_gives_the_unfused_model(recompute):
    """The whole model (GQA, two bases, dropout) with HARPE's Triton kernel (interpreted here) against
    megatron-core's table path: same loss, same gradients; with full recompute the inverse frequencies
    the layers receive cross the activation checkpoint."""
    model_cfg = dataclasses.replace(_model(), num_layers=2, hidden_dropout=0.1, attention_dropout=0.1)
    plain_loss, plain_grads = _loss_and_grads(model_cfg)
    loss, grads = _loss_and_grads(model_cfg, kernel="fused", **recompute)
    assert abs(loss - plain_loss) < 1e-6
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=2e-6, msg=name)


# ----------------------------------------------------------------------------- overlap_param_gather
def test_save_under_overlap_param_gather_holds_the_current_weights(tmp_path):
    """DP=2 with the distributed optimizer: each rank updates half of the parameters and the other half
    arrives by all-gather, which overlap_param_gather defers to the next forward. The checkpoint written
    after the last step must hold the updated weights everywhere: equal to a run without overlap."""
    from megatron_harpe.convert.megatron_io import build_full_model, single_process_world
    from megatron_harpe.models.checkpoint import load_model

    common = ["--", "--config", TINY, "parallel.distributed_optimizer=true", "training.iterations=3"]
    weights = {}
    for name, overlap in (("overlap", "true"), ("plain", "false")):
        run = tmp_path / name
        result = run_workers("tests/workers/train_worker.py", 2, tmp_path / f"out_{name}", *common,
                             f"run_dir={run}", f"parallel.overlap_param_gather={overlap}",
                             f"parallel.overlap_grad_reduce={overlap}")
        assert result[0]["exit_code"] == 0, result[0]["reason"]
        model_cfg = load_config(TINY).model
        with single_process_world():
            model = build_full_model(model_cfg, torch.float32)
            load_model([model], model_cfg, run / "checkpoints" / "iter_0000003")
            weights[name] = {n: p.detach().clone() for n, p in model.named_parameters()}
        weights[name + "_losses"] = result[0]["losses"]
    assert json.dumps(weights["overlap_losses"]) == json.dumps(weights["plain_losses"])
    for n, tensor in weights["plain"].items():
        torch.testing.assert_close(weights["overlap"][n], tensor, rtol=0, atol=0, msg=n)


# ----------------------------------------------------------------------------- Python 3.12 clusters
def test_python_3_12_is_accepted_and_parses_the_package():
    """NGC PyTorch containers run Python 3.12: setup.py must accept it and every module must parse there
    (checked with a 3.12 interpreter when the machine has one; pyenv's on these machines)."""
    import glob
    import re
    import shutil
    import subprocess
    import sys

    from packaging.specifiers import SpecifierSet

    requires = re.search(r'python_requires="([^"]+)"', (REPO_ROOT / "setup.py").read_text()).group(1)
    assert all(v in SpecifierSet(requires) for v in ("3.10", "3.11", "3.12"))
    python312 = shutil.which("python3.12") if shutil.which("python3.12") else None
    candidates = ([python312] if python312 else []) + sorted(glob.glob("/root/.pyenv/versions/3.12*/bin/python3.12"))
    usable = [c for c in candidates if subprocess.run([c, "-c", "pass"], capture_output=True).returncode == 0]
    if not usable:
        pytest.skip("no Python 3.12 interpreter on this machine")
    code = ("import ast, pathlib, sys\n"
            "for f in sorted(pathlib.Path('megatron_harpe').rglob('*.py')): ast.parse(f.read_text(), str(f))\n"
            "print(sys.version_info[:2])")
    out = subprocess.run([usable[0], "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "(3, 12)", (out.stdout, out.stderr, sys.version)
