"""Evaluation during training: the passkey probe's prompts and scores, checked against a direct reference
computed from the model's full logits, and the config checks. The validation loss and the probes under
TP, PP (x VPP), CP and DP are checked in tests/test_trainer.py, inside runs those tests make anyway
(equal across layouts; and evaluating does not change the training trace)."""
import pytest
import torch

from megatron_harpe.config.loader import load_config
from megatron_harpe.config.model import ModelConfig, PositionEmbeddingConfig
from megatron_harpe.config.validate import validate_config
from megatron_harpe.data.tokenizer import load_tokenizer
from megatron_harpe.training.probes import build_probe_prompts, score_probes
from tests.data_fixtures import *  # noqa: F401,F403
from tests.launch import REPO_ROOT

VOCAB = 1024


def test_probe_prompts_fill_the_length_and_mark_exactly_the_key(spm_model):
    tok = load_tokenizer("sentencepiece", spm_model)
    prompts = build_probe_prompts(tok, [128, 300], prompts=3, seed=0)
    assert [(p.length, p.index) for p in prompts] == [(128, 0), (128, 1), (128, 2), (300, 0), (300, 1), (300, 2)]
    for p in prompts:
        assert p.tokens.shape == p.labels.shape == p.loss_mask.shape == (p.length,)
        assert torch.equal(p.tokens[1:], p.labels[:-1])  # labels are the next tokens
        key = tok.decode(p.labels[p.loss_mask > 0].tolist()).strip()
        assert key == p.passkey, (key, p.passkey)
        text = tok.decode(p.tokens.tolist())
        assert f"The pass key is {p.passkey}." in text and text.count("What is the pass key?") == 1
        # filled: one more filler sentence would not fit, so little EOD padding is left
        assert (p.tokens == tok.eod).sum() < 16
    # the key sits deeper in the text as the depth grows
    for length in (128, 300):
        starts = [tok.decode(p.tokens.tolist()).index("The pass key is") for p in prompts if p.length == length]
        assert starts == sorted(starts) and starts[0] < starts[-1]
    again = build_probe_prompts(tok, [128], prompts=3, seed=0)
    assert [p.passkey for p in again] == [p.passkey for p in prompts[:3]]
    assert [p.passkey for p in build_probe_prompts(tok, [128], prompts=3, seed=1)] != [p.passkey for p in again]


def test_probe_scores_equal_a_reference_from_full_logits(spm_model):
    """exact / token accuracy / nll from the scorer (vocabulary-sliced, masked rows only) equal those
    computed from the whole [seq, vocab] logits; the first prompt's targets are set to the model's own
    argmax, so its exact score is 1 and the argmax path is exercised, the others keep the real key."""
    from megatron_harpe.convert.megatron_io import single_process_world
    from megatron_harpe.models.provider import build_model
    from megatron_harpe.models.transformer_config import build_transformer_config

    tok = load_tokenizer("sentencepiece", spm_model)
    prompts = build_probe_prompts(tok, [160], prompts=3, seed=2)
    model_cfg = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                            num_query_groups=2, vocab_size=VOCAB, max_position_embeddings=256,
                            position=PositionEmbeddingConfig(kind="harpe", bases=[1e4, 2e5]))
    with single_process_world():
        torch.manual_seed(0)
        model = build_model(model_cfg, build_transformer_config(model_cfg, params_dtype=torch.float32)).eval()
        with torch.no_grad():
            logits = [model(p.tokens[None], torch.arange(p.length)[None], None)[0] for p in prompts]
        mask0 = prompts[0].loss_mask > 0
        prompts[0].labels[mask0] = logits[0][mask0].argmax(-1)
        scores = score_probes([model], prompts, dp_rank=0, dp_size=1, context_parallel=1, virtual_pipeline=False,
                              device=torch.device("cpu"))
    correct, count, nll, exact = 0, 0, 0.0, []
    for p, full in zip(prompts, logits):
        mask = p.loss_mask > 0
        hits = (full[mask].argmax(-1) == p.labels[mask])
        correct, count = correct + int(hits.sum()), count + int(mask.sum())
        nll -= float(torch.log_softmax(full[mask].double(), -1).gather(1, p.labels[mask][:, None]).sum())
        exact.append(bool(hits.all()))
    assert exact[0] and scores["probe_passkey_160_exact"] == pytest.approx(sum(exact) / 3)
    assert scores["probe_passkey_160_token_accuracy"] == pytest.approx(correct / count)
    assert scores["probe_passkey_160_nll"] == pytest.approx(nll / count, rel=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (["training.eval_interval=-1"], "training.eval_interval must be >= 0"),
    (["training.eval_interval=2", "training.eval_iterations=0"], "training.eval_iterations must be >= 1"),
    (["training.probe.lengths=[128]"], "neither training.probe.interval nor training.eval_interval"),
    (["training.probe.lengths=[128]", "training.eval_interval=2"], "training.probe needs data.tokenizer_model"),
    (["training.probe.lengths=[130]", "training.probe.interval=2", "parallel.context=2", "TOKENIZER"],
     "training.probe.lengths: 130 must be >= 64 and a multiple of 4"),
])
def test_evaluation_settings_are_checked_before_training(spm_model, overrides, message):
    overrides = [f"data.tokenizer_model={spm_model}" if o == "TOKENIZER" else o for o in overrides]
    cfg = load_config(f"{REPO_ROOT}/examples/tiny/harpe.yaml", overrides)
    with pytest.raises(ValueError, match=message.replace("(", "\\(").replace("[", "\\[")):
        validate_config(cfg, world_size=2)


def test_an_empty_validation_split_is_refused_when_evaluating(tmp_path):
    prefix = tmp_path / "corpus_text_document"
    for suffix in (".bin", ".idx"):
        (tmp_path / f"corpus_text_document{suffix}").write_bytes(b"")  # existence is what the config check reads
    cfg = load_config(f"{REPO_ROOT}/examples/tiny/harpe.yaml",
                      ["data.kind=indexed", f"data.blend=[{prefix}]", "data.split=100,0,0", "training.eval_interval=4"])
    with pytest.raises(ValueError, match="needs a validation split: data.split '100,0,0' gives it nothing"):
        validate_config(cfg, world_size=1)
