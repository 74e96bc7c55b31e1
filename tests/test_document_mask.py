"""Document masking (data.document_mask): attention and HARPE positions restart at every document.

Unit tests of the packing (training/packing.py) on hand-written EOD layouts, exact to the index;
then ONE 2-rank gloo launch (tests/workers/document_mask.py) that checks, on a tiny HARPE model in
fp64, that a packed micro-batch equals its documents run one by one (losses, loss sum, gradients),
at CP=1 and CP=2, that the unmasked path is today's (documents see each other there), and that
harpe-train with data.document_mask=true on real indexed data (sentencepiece EODs) trains the same
model at DP=2, CP=2 and PP=2.
"""
import json

import pytest
import torch

from megatron_harpe.config.loader import load_config
from megatron_harpe.config.validate import validate_config
from megatron_harpe.training.packing import (document_layout, pack_micro_batch, rank_rows, stream_multiple)
from tests.data_fixtures import *  # noqa: F401,F403
from tests.launch import REPO_ROOT, run_workers

E = 9  # the EOD id of the hand-written layouts


def test_layout_of_documents_ending_at_eod_and_at_sample_ends():
    # sample 0: [1 2 E][3 4 5 E][6]; sample 1: [7 E][8 8 8 8 8 8]  (the EOD ends its document)
    tokens = torch.tensor([[1, 2, E, 3, 4, 5, E, 6], [7, E, 8, 8, 8, 8, 8, 8]])
    layout = document_layout(tokens, E)
    assert layout.cu_seqlens.tolist() == [0, 3, 7, 8, 10, 16]
    assert layout.cu_seqlens_padded.tolist() == [0, 3, 7, 8, 10, 16]  # no CP: no padding
    assert layout.cu_seqlens.dtype == layout.cu_seqlens_padded.dtype == torch.int32
    assert layout.max_seqlen == 6 and layout.num_documents == 5
    source, position = rank_rows(layout)
    assert source.tolist() == list(range(16))
    assert position.tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 0, 1, 0, 1, 2, 3, 4, 5]


def test_an_eod_at_the_sample_end_makes_no_empty_document():
    layout = document_layout(torch.tensor([[E, 1, 2, E], [3, 4, 5, 6]]), E)
    assert layout.cu_seqlens.tolist() == [0, 1, 4, 8]


def test_context_parallel_partition_gives_each_rank_chunks_r_and_2cp_minus_1_minus_r():
    tokens = torch.tensor([[1, 2, E, 3, 4, 5, E, 6], [7, E, 8, 8, 8, 8, 8, 8]])
    layout = document_layout(tokens, E, cp_size=2)  # documents padded to multiples of 4
    assert layout.cu_seqlens.tolist() == [0, 3, 7, 8, 10, 16]
    assert layout.cu_seqlens_padded.tolist() == [0, 4, 8, 12, 16, 24]
    assert layout.max_seqlen == 8
    # chunk length 1 (documents of 4) or 2 (the last, 8); -1 = padding row
    src0, pos0 = rank_rows(layout, 2, 0)
    src1, pos1 = rank_rows(layout, 2, 1)
    assert src0.tolist() == [0, -1, 3, 6, 7, -1, 8, -1, 10, 11, -1, -1]
    assert pos0.tolist() == [0, 3, 0, 3, 0, 3, 0, 3, 0, 1, 6, 7]
    assert src1.tolist() == [1, 2, 4, 5, -1, -1, 9, -1, 12, 13, 14, 15]
    assert pos1.tolist() == [1, 2, 1, 2, 1, 2, 1, 2, 2, 3, 4, 5]
    # together the ranks hold every real token exactly once
    real = torch.cat([src0, src1])
    assert sorted(real[real >= 0].tolist()) == list(range(16))


def test_cp4_and_a_stream_rounded_up_for_sequence_parallelism():
    tokens = torch.tensor([[1, 2, 3, E, 4, 5, 6, 7, 8, 1, 1, 2, 3, 4, 5, 6]])  # documents of 4 and 12
    layout = document_layout(tokens, E, cp_size=4)  # padded to multiples of 8
    assert layout.cu_seqlens_padded.tolist() == [0, 8, 24] and layout.max_seqlen == 16
    src, pos = rank_rows(layout, 4, 1)  # chunks 1 and 6 of every document (chunk lengths 1 and 2)
    assert src.tolist() == [1, -1, 6, 7, -1, -1] and pos.tolist() == [1, 6, 2, 3, 12, 13]
    # CP=2 x TP=3 with sequence parallelism: the stream becomes a multiple of 12 (last document padded)
    multiple = stream_multiple(2, 3, sequence_parallel=True)
    assert multiple == 12 and stream_multiple(1) == 1 and stream_multiple(2, fp8=True) == 128
    layout = document_layout(tokens, E, cp_size=2, total_multiple=multiple)
    assert layout.cu_seqlens_padded.tolist() == [0, 4, 24]
    with pytest.raises(ValueError, match="multiple of 2\\*cp_size"):
        document_layout(tokens, E, cp_size=2, total_multiple=6)


def test_packed_rows_carry_tokens_labels_and_mask_and_padding_is_masked():
    tokens = torch.tensor([[1, 2, E, 3, 4, 5, E, 6], [7, E, 8, 8, 8, 8, 8, 8]])
    batch = {"tokens": tokens, "labels": tokens + 100, "loss_mask": (tokens != E).float()}
    packed, layout = pack_micro_batch(batch, E, cp_size=2, cp_rank=1)
    assert packed["tokens"].tolist() == [[2, E, 4, 5, E, E, E, E, 8, 8, 8, 8]]
    assert packed["labels"].tolist() == [[102, 109, 104, 105, E, E, 109, E, 108, 108, 108, 108]]
    # EOD rows keep eod_mask_loss's 0; padding rows are 0
    assert packed["loss_mask"].tolist() == [[1, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1]]
    assert packed["position_ids"].tolist() == [[1, 2, 1, 2, 1, 2, 1, 2, 2, 3, 4, 5]]
    # the two ranks count exactly the real tokens the unpacked batch counts
    other, _ = pack_micro_batch(batch, E, cp_size=2, cp_rank=0)
    assert packed["loss_mask"].sum() + other["loss_mask"].sum() == batch["loss_mask"].sum()


@pytest.mark.parametrize("overrides, message", [
    (["data.document_mask=true"], "data.document_mask needs documents"),
    (["data.reset_position_ids=true"], "data.reset_position_ids alone changes nothing"),
])
def test_bad_document_mask_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        validate_config(load_config(f"{REPO_ROOT}/examples/tiny/harpe.yaml", overrides), world_size=1)


@pytest.fixture(scope="module")
def short_documents(tmp_path_factory, corpus_jsonl, spm_model):
    """A real indexed dataset of short documents (3..40 words of the demo corpus, EOD after each),
    tokenized by the real sentencepiece model: several documents in every 64-token sample."""
    from megatron_harpe.data import preprocess

    base = tmp_path_factory.mktemp("docmask_data")
    words = " ".join(json.loads(line)["text"] for line in open(corpus_jsonl, encoding="utf-8")
                     if line.strip()).split()
    gen = torch.Generator().manual_seed(0)
    lines, at = [], 0
    for _ in range(120):
        n = int(torch.randint(3, 41, (1,), generator=gen))
        lines.append(json.dumps({"text": " ".join(words[at:at + n])}))
        at += n
    (base / "docs.jsonl").write_text("\n".join(lines) + "\n")
    assert preprocess.main(["--input", str(base / "docs.jsonl"), "--tokenizer-type", "sentencepiece",
                            "--tokenizer-model", spm_model, "--output-prefix", str(base / "short"), "--workers", "0",
                            "--append-eod", "--no-progress"]) == 0
    return str(base / "short_text_document"), spm_model


@pytest.fixture(scope="module")
def results(tmp_path_factory, short_documents):
    prefix, tokenizer = short_documents
    out = tmp_path_factory.mktemp("docmask")
    return run_workers("tests/workers/document_mask.py", 2, out, "--blend", prefix, "--tokenizer", tokenizer,
                       "--runs", str(out / "runs"))


def test_packed_batch_equals_its_documents_run_one_by_one(results):
    for rank in results:
        v = rank["cp1"]
        assert v["documents"] == 7 and v["cu_seqlens"] == [0, 5, 18, 32, 42, 43, 63, 64]
        assert v["loss_max_diff"] < 1e-12, v
        assert abs(v["sum"] - v["ref_sum"]) < 1e-10 * abs(v["ref_sum"]), v
        assert v["grad_max_diff"] < 1e-12 * max(1.0, v["grad_scale"]), v
        assert v["tokens_counted"] == v["real_tokens"] == 58  # 64 tokens, 6 EODs masked (eod_mask_loss)


def test_packed_batch_under_context_parallelism_equals_cp1(results):
    for rank in results:
        v = rank["cp2"]
        # documents of 5,13,14,10,1,20,1 padded to multiples of 2*cp = 4
        assert v["cu_seqlens_padded"] == [0, 8, 24, 40, 52, 56, 76, 80] and v["local_rows"] == 40
        assert v["loss_max_diff"] < 1e-12, v
        assert v["padding_rows"] > 0 and v["padding_loss_mask_max"] == 0.0
        assert abs(v["sum"] - v["ref_sum"]) < 1e-10 * abs(v["ref_sum"]), v
        assert v["tokens_counted"] == v["real_tokens"] == 58  # padding is not counted
        assert v["grad_max_diff"] < 1e-12 * max(1.0, rank["cp1"]["grad_scale"]), v


def test_without_masking_documents_attend_to_each_other(results):
    """Today's path ([b, s], causal over the whole sample): equal to the documents run alone on each
    sample's first document, different on every later one - so the masking is what makes the packed
    batch equal them."""
    for rank in results:
        v = rank["unmasked"]
        assert v["first_document_max_diff"] < 1e-12, v
        assert v["later_documents_min_diff"] > 1e-4 and v["later_documents_mean_diff"] > 1e-2, v
        w = rank["no_eod"]  # and without EODs the packed path IS the plain one
        assert w["cu_seqlens"] == [0, 32, 64]
        assert w["loss_max_diff"] < 1e-12 and w["grad_max_diff"] < 1e-12, w


def test_harpe_train_with_document_mask_trains_the_same_model_in_every_layout(results):
    """From the same weights, harpe-train with data.document_mask=true on real indexed data gives the
    same losses at DP=2, CP=2 (documents padded, each rank holding chunks of every document) and PP=2
    (variable-length activations between stages): the loss counts real tokens only. Without masking
    the loss differs."""
    train = results[0]["train"]
    assert all(run["exit_code"] == 0 for run in train.values()), train
    for rank in results[1:]:
        assert rank["train"]["dp2"]["losses"] == train["dp2"]["losses"]
    masked = {int(k): v for k, v in train["dp2"]["losses"].items()}
    assert sorted(masked) == [1, 2]
    for layout in ("cp2", "pp2"):
        other = {int(k): v for k, v in train[layout]["losses"].items()}
        assert other.keys() == masked.keys()
        for it in masked:
            assert abs(other[it] - masked[it]) < 2e-5, (layout, other, masked)
    unmasked = {int(k): v for k, v in train["dp2_unmasked"]["losses"].items()}
    assert abs(unmasked[1] - masked[1]) > 1e-3, (unmasked, masked)
