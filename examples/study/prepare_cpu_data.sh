#!/usr/bin/env bash
# Data and starting model for the CPU study (examples/study/cpu.yaml), one command, resumable:
#   bash examples/study/prepare_cpu_data.sh [OUT_DIR]          (default runs/study_cpu_data)
# 1. a generated corpus and held-out documents (megatron_harpe.data.corpus: English-like documents, ~5% passkey documents short
#    enough to fit the study's 256-token training length, so retrieval is something it can learn)
# 2. a sentencepiece tokenizer trained on it (harpe-train-tokenizer, vocab 1024)
# 3. the corpus as indexed data (harpe-preprocess)
# 4. the short-context "base model" every method starts from (the paper's Llama-2 at 4k, here: RoPE base
#    10000 at 64 tokens, examples/study/cpu/base_short.yaml), so that the study is continual pretraining
#    4x past the context the model was trained at, as in the paper (4k -> 128k is 32x).
# Steps whose outputs exist are skipped. About 3-5 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/study_cpu_data}
# the Python with megatron-harpe: $HARPE_PYTHON, else the repository's .venv, else python on PATH
if [ -n "${HARPE_PYTHON:-}" ]; then PY=$HARPE_PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
mkdir -p "$OUT"
if [ ! -s "$OUT/heldout.jsonl" ]; then
    echo "[1/4] corpus -> $OUT/corpus.jsonl, held-out documents for perplexity -> $OUT/heldout.jsonl"
    "$PY" -c "
import sys
from megatron_harpe.data.corpus import write_demo_corpus
# long_words bounds passkey documents to ~(lo..hi/4) filler sentences (~5 tokens each): under 256 tokens
info = write_demo_corpus(sys.argv[1], num_docs=3000, seed=1234, passkey_fraction=0.05, needle_fraction=0.0,
                         long_fraction=0.02, long_words=(300, 160))
print(info['documents'], 'documents,', round(info['chars_text'] / 1e6, 1), 'M characters', info['per_source'])
# held-out: another seed, every document longer than 4x the training length (1200-2000 words)
write_demo_corpus(sys.argv[2], num_docs=12, seed=5678, passkey_fraction=0.0, needle_fraction=0.0,
                  long_fraction=1.0, long_words=(1200, 2000))
" "$OUT/corpus.jsonl" "$OUT/heldout.jsonl"
fi
if [ ! -s "$OUT/tokenizer/tokenizer.model" ]; then
    echo "[2/4] tokenizer -> $OUT/tokenizer"
    "$PY" -m megatron_harpe.data.train_tokenizer --input "$OUT/corpus.jsonl" --type sentencepiece \
        --vocab-size 1024 --output-dir "$OUT/tokenizer" --max-lines 200000
fi
if [ ! -s "$OUT/data/corpus_text_document.idx" ]; then
    echo "[3/4] indexed data -> $OUT/data/corpus_text_document"
    mkdir -p "$OUT/data"
    "$PY" -m megatron_harpe.data.preprocess --input "$OUT/corpus.jsonl" --tokenizer-type sentencepiece \
        --tokenizer-model "$OUT/tokenizer/tokenizer.model" --output-prefix "$OUT/data/corpus" --append-eod --workers 2
fi
if [ ! -f "$OUT/base_short/.prepared" ]; then
    echo "[4/4] short-context base model (64 tokens, RoPE base 10000) -> $OUT/base_short"
    "$PY" -m megatron_harpe.train --config examples/study/cpu/base_short.yaml run_dir="$OUT/base_short" \
        "data.blend=[$OUT/data/corpus_text_document]" "data.tokenizer_model=$OUT/tokenizer/tokenizer.model"
    touch "$OUT/base_short/.prepared"
fi
echo "ready: $OUT (tokenizer, data, base_short/checkpoints)"
