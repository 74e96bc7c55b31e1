#!/bin/bash
# Submit sharded preprocessing: the harpe-preprocess array job, then the merge job (afterok on the array).
#
#   OUTPUT_PREFIX=data/slimpj INPUTS='raw/*.jsonl.gz' \
#   PREPROCESS_ARGS="--tokenizer-type sentencepiece --tokenizer-model llama2/tokenizer.model --append-eod" \
#       slurm/submit_preprocess.sh [sbatch options for both jobs]
#
#   INPUTS          input files: a glob (expanded here, sorted) or several, whitespace-separated; or
#   INPUT_LIST      a file with one input path per line (its order is the output's order)
#   FILES_PER_TASK  input files per array task (default 1); MAX_PARALLEL caps running array tasks (%N)
#   KEEP_SHARDS=1   keep ${OUTPUT_PREFIX}.shards/ after the merge
# Prints "array <id>" and "merge <id>". If a shard task fails, the merge job never runs
# (DependencyNeverSatisfied): fix the cause, then resubmit (finished shards are simply redone).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${OUTPUT_PREFIX:?set OUTPUT_PREFIX (as harpe-preprocess --output-prefix)}"
SHARDS="${OUTPUT_PREFIX}.shards"
mkdir -p "$SHARDS"
LIST="$SHARDS/inputs.txt"
if [[ -n ${INPUT_LIST:-} ]]; then
    grep -v '^[[:space:]]*$' "$INPUT_LIST" > "$LIST"
else
    : "${INPUTS:?set INPUTS (a glob or files) or INPUT_LIST (a file listing inputs)}"
    read -r -a PATTERNS <<< "$INPUTS"
    : > "$LIST"
    for pattern in "${PATTERNS[@]}"; do
        # shellcheck disable=SC2206
        matches=( $pattern )
        [[ -e ${matches[0]} ]] || { echo "submit_preprocess.sh: INPUTS pattern '$pattern' matches nothing" >&2; exit 2; }
        printf '%s\n' "${matches[@]}" | LC_ALL=C sort >> "$LIST"
    done
fi
N=$(wc -l < "$LIST")
(( N > 0 )) || { echo "submit_preprocess.sh: no input files" >&2; exit 2; }
K=${FILES_PER_TASK:-1}
TASKS=$(( (N + K - 1) / K ))
ARRAY="0-$((TASKS - 1))${MAX_PARALLEL:+%$MAX_PARALLEL}"
export OUTPUT_PREFIX FILES_PER_TASK=$K
ARRAY_ID=$(PREPROCESS_STEP=shard sbatch --parsable --array="$ARRAY" "$@" "$HERE/preprocess.sbatch")
ARRAY_ID=${ARRAY_ID%%;*}
MERGE_ID=$(PREPROCESS_STEP=merge sbatch --parsable --dependency="afterok:$ARRAY_ID" --kill-on-invalid-dep=yes \
           --job-name=harpe-merge --output=%x-%j.out "$@" "$HERE/preprocess.sbatch")
MERGE_ID=${MERGE_ID%%;*}
echo "array $ARRAY_ID ($TASKS task(s), $N file(s))"
echo "merge $MERGE_ID (after the array succeeds) -> ${OUTPUT_PREFIX}_<key>_document.bin/.idx"
