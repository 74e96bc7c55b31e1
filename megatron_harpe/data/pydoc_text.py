"""Real English text offline: the documentation of Python's own standard library (pydoc).

Every Python installation carries it, so tests and the demo can score or train a real model on real text without
a download:

    from megatron_harpe.data.pydoc_text import pydoc_documents, pydoc_module_texts, write_jsonl
    pydoc_documents()                          # short documents (whole paragraphs, >= 300 characters each)
    pydoc_module_texts(("json", "re"))         # one long document per module (json: ~5.9k SmolLM2 tokens)
    write_jsonl("docs.jsonl", pydoc_module_texts(LONG_MODULES))    # what harpe-eval ppl --data reads

The text is pydoc's plain-text rendering (`python -m pydoc json`) less its FILE section (the module's path on this
machine), so it depends only on the Python version (its docstrings), not on where Python is installed.
"""
from __future__ import annotations

import importlib
import json
import os
import pydoc
from typing import Iterable, List, Sequence

__all__ = ["MODULES", "LONG_MODULES", "pydoc_text", "pydoc_documents", "pydoc_module_texts", "write_jsonl"]

#: small modules: tests/test_init_check.py's training text (~100-token documents)
MODULES = ("json", "textwrap", "shlex", "fnmatch", "heapq", "bisect", "base64", "string")
#: modules whose documentation is longer than 4,096 tokens of SmolLM2's tokenizer on Python 3.10-3.12 (json 5.9k,
#: statistics 6.4k, random 5.9k, re 7.3k on 3.11): long documents for perplexity at 1k and 4k tokens
LONG_MODULES = ("json", "statistics", "random", "re")


def pydoc_text(module: str) -> str:
    """The plain-text pydoc of ``module``, without its FILE section (a path on this machine)."""
    text = pydoc.render_doc(importlib.import_module(module), renderer=pydoc.plaintext)
    sections = text.split("\n\n")
    return "\n\n".join(s for s in sections if not s.startswith("FILE\n")).strip() + "\n"


def pydoc_documents(modules: Sequence[str] = MODULES, chars: int = 300) -> List[str]:
    """Each module's pydoc cut into documents of whole paragraphs (each >= ``chars`` characters but the last)."""
    documents = []
    for name in modules:
        text = pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext)
        current: List[str] = []
        for paragraph in (p.strip() for p in text.split("\n\n")):
            if paragraph:
                current.append(paragraph)
            if sum(map(len, current)) >= chars:
                documents.append("\n\n".join(current))
                current = []
        if current:
            documents.append("\n\n".join(current))
    return documents


def pydoc_module_texts(modules: Sequence[str] = LONG_MODULES) -> List[str]:
    """One document per module: its whole pydoc (see :func:`pydoc_text`)."""
    return [pydoc_text(name) for name in modules]


def write_jsonl(path: str | os.PathLike, documents: Iterable[str]) -> int:
    """Write ``documents`` as jsonl (``{"text": ...}`` per line); returns how many."""
    count = 0
    with open(path, "w", encoding="utf-8") as fh:
        for text in documents:
            fh.write(json.dumps({"text": text}) + "\n")
            count += 1
    return count
