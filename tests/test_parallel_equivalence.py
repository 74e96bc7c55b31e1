"""HARPE is parallel-correct: every layout reproduces the single-process model.

A tiny Llama-style model with HARPE and GQA (4 query heads, 2 K/V groups, bases 1e4 and 1e6)
runs one forward/backward step through megatron-core's schedules, DDP and
finalize_model_grads in each layout; per-token losses, logits and every parameter's gradient
must equal the TP=PP=CP=DP=1 model's (fp32). The negative controls break HARPE's slicing on
purpose and must be detected by the same comparison. See tests/workers/parallel_equivalence.py.
"""
import pytest

from tests.launch import run_workers

WORKER = "tests/workers/parallel_equivalence.py"
TWO_RANKS = ["tp2", "tp2_sp", "pp2", "cp2", "dp2", "tp2_wrong_bases", "cp2_wrong_positions", "equal_bases_vs_rope",
             "thd_packed_cp1", "thd_packed_cp2", "thd_packed_cp2_fused", "checkpoint_tp2_to_tp1", "position_kinds"]
FOUR_RANKS = ["tp2_pp2", "tp2_cp2", "cp2_dp2", "tp2_cp2_fused"]

LOSS_TOL, LOGIT_TOL, GRAD_TOL = 5e-6, 5e-6, 5e-7


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    return run_workers(WORKER, 2, tmp_path_factory.mktemp("pe2"), "--scenarios", ",".join(TWO_RANKS))


@pytest.fixture(scope="module")
def four_rank_results(tmp_path_factory):
    return run_workers(WORKER, 4, tmp_path_factory.mktemp("pe4"), "--scenarios", ",".join(FOUR_RANKS))


LAYOUTS = {"tp2": (2, 1), "tp2_sp": (2, 1), "pp2": (1, 1), "cp2": (1, 2), "dp2": (1, 1),
           "tp2_pp2": (2, 1), "tp2_cp2": (2, 2), "cp2_dp2": (1, 2), "tp2_cp2_fused": (2, 2)}


def assert_matches_reference(per_rank, scenario):
    tp, cp = LAYOUTS[scenario]
    for rank, results in enumerate(per_rank):
        verdict = results[scenario]
        # the rotary module holds only this rank's K/V groups and positions (2 groups, 4 heads, 32 tokens)
        assert verdict["local_groups"] == 2 // tp
        if "fused_output_shape" in verdict:  # fused kernel: the layers get inverse frequencies, no table
            assert verdict["fused_output_shape"] == [2 // tp, 8]
        else:
            assert verdict["k_angle_shape"] == [32 // cp, 1, 2 // tp, 16]
            assert verdict["q_angle_shape"] == [32 // cp, 1, 4 // tp, 16]
        assert verdict["num_params_checked"] > 0
        assert verdict["grad_max_diff"] < GRAD_TOL, (rank, verdict["grad_worst_param"], verdict["grad_max_diff"])
        if "loss_max_diff" in verdict:  # last pipeline stage
            assert verdict["loss_max_diff"] < LOSS_TOL, (rank, verdict)
            assert verdict["logit_max_diff"] < LOGIT_TOL, (rank, verdict)
    assert any("loss_max_diff" in results[scenario] for results in per_rank)


@pytest.mark.parametrize("scenario", ["tp2", "tp2_sp", "pp2", "cp2", "dp2"])
def test_two_rank_layout_matches_single_process(two_rank_results, scenario):
    assert_matches_reference(two_rank_results, scenario)


@pytest.mark.parametrize("scenario", FOUR_RANKS)
def test_four_rank_layout_matches_single_process(four_rank_results, scenario):
    assert_matches_reference(four_rank_results, scenario)


@pytest.mark.parametrize("scenario", ["tp2_wrong_bases", "cp2_wrong_positions"])
def test_wrong_slices_are_detected(two_rank_results, scenario):
    """A TP rank with the other rank's bases, or a CP rank with contiguous positions, must fail
    the same checks by a wide margin (the checks can see slicing bugs)."""
    for results in two_rank_results:
        verdict = results[scenario]
        assert verdict["loss_max_diff"] > 100 * LOSS_TOL, verdict
        assert verdict["grad_max_diff"] > 100 * GRAD_TOL, verdict


def test_equal_bases_are_bit_identical_to_megatron_rope(two_rank_results):
    for results in two_rank_results:
        verdict = results["equal_bases_vs_rope"]
        assert verdict["bit_identical"], verdict
        assert verdict["differs_from_harpe_reference"] > 1e-3


@pytest.mark.parametrize("scenario", ["thd_packed_cp1", "thd_packed_cp2", "thd_packed_cp2_fused"])
def test_packed_documents_restart_positions(two_rank_results, scenario):
    """Three documents packed (THD) give each document the logits of its own forward pass, and every
    token is rotated by its position inside its own document (not merely by a consistent shift,
    which logits cannot see)."""
    for results in two_rank_results:
        verdict = results[scenario]
        assert verdict["max_diff"] < LOGIT_TOL, verdict
        assert verdict["differs_from_unpacked"] > 1e-2, verdict
        if scenario.endswith("_fused"):
            continue  # the kernel's per-token positions are checked in tests/test_fused_rope.py
        assert verdict["rotation_vs_document_positions"] < 1e-5, verdict
        assert verdict["rotation_vs_shifted_positions"] > 1e-2, verdict


def test_checkpoint_saved_at_tp2_loads_at_tp1_with_its_bases(two_rank_results):
    """torch_dist checkpoint: resharded TP=2 -> TP=1 gives the same logits; the HARPE base set is
    stored in the checkpoint (megatron-core drops inv_freq) and a different configured set is refused."""
    for results in two_rank_results:
        verdict = results["checkpoint_tp2_to_tp1"]
        assert verdict["max_diff"] < LOGIT_TOL, verdict
        assert verdict["saved_bases"] == [10000.0, 1000000.0] == verdict["bases_on_disk"]
        assert "bases: checkpoint" in verdict["refusal"] and "[10000.0, 2000000.0]" in verdict["refusal"]
        assert verdict["no_staging_left"]
        # keys as Transformer Engine's spec names them, so checkpoints move between CPU and TE clusters
        assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in verdict["saved_keys"]
        assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" in verdict["saved_keys"]


def test_every_position_scheme_builds_and_trains(two_rank_results):
    verdict = two_rank_results[0]["position_kinds"]
    assert verdict["types_ok"], verdict
    losses = {kind: verdict[kind]["loss"] for kind in ("rope", "pi", "yarn", "harpe")}
    assert all(verdict[kind]["grads_finite"] for kind in losses), verdict
    assert len({round(v, 6) for v in losses.values()}) == 4, losses  # four different models
    assert verdict["pi"]["pi_positions_scaled"]
