"""Data: tokenizers, jsonl -> megatron-core indexed datasets, per-source length upsampling and
packing, GPTDatasets for training, and a generated demo corpus. See docs/data.md.

Command-line tools: ``harpe-train-tokenizer`` (train_tokenizer.py), ``harpe-preprocess``
(preprocess.py), ``harpe-upsample`` (upsample.py). Importing this package does not import
torch or megatron-core; ``gpt.py`` and ``helpers.py`` do, when used.
"""
from megatron_harpe.data.corpus import generate_documents, needle_document, passkey_document, write_demo_corpus
from megatron_harpe.data.indexed import IndexedDatasetWriter, check_indexed_dataset, read_index
from megatron_harpe.data.inputs import DataError
from megatron_harpe.data.tokenizer import (HuggingFaceTokenizer, SentencePieceTokenizer, Tokenizer, TokenizerError,
                                           load_tokenizer)

__all__ = ["write_demo_corpus", "generate_documents", "passkey_document", "needle_document", "load_tokenizer",
           "Tokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer", "TokenizerError", "DataError",
           "IndexedDatasetWriter", "read_index", "check_indexed_dataset"]
