"""Real English text offline for the SmolLM2 example: Python's own documentation (pydoc of standard-library modules).

    python examples/smollm2/make_text.py OUT_DIR        -> OUT_DIR/train.jsonl, OUT_DIR/heldout.jsonl

Why pydoc: the example must not download anything, and a CPU-sized run needs real prose (not generated text) that
the model has not memorised verbatim. Each module's whole documentation is one document; the held-out modules are
never trained on and are each longer than 8,192 tokens (SmolLM2's trained length), so perplexity at 8k reads
one document per window. The text depends on the Python version (pydoc prints file paths and version-specific
APIs): compare numbers made with the same Python.
"""
from __future__ import annotations

import importlib
import json
import pydoc
import sys
from pathlib import Path

#: never trained on; each > 9k tokens with SmolLM2's tokenizer (Python 3.11)
HELDOUT = ("logging", "collections", "pathlib", "http.client")
#: the training text: ~350k tokens, more than any CPU-sized run reads
TRAIN = ("os", "typing", "argparse", "tarfile", "zipfile", "unittest", "decimal", "datetime", "subprocess",
         "threading", "email.message", "urllib.request", "sqlite3", "socket", "json", "textwrap", "shlex", "string",
         "random", "statistics", "fractions", "functools", "itertools", "inspect", "difflib", "configparser", "csv",
         "calendar", "enum", "dataclasses", "pickle", "shutil", "tempfile", "io", "re", "struct", "array", "heapq",
         "bisect", "queue", "contextlib", "abc", "numbers", "math", "operator", "copy", "weakref", "codecs",
         "ftplib", "smtplib", "imaplib", "mailbox", "base64", "hashlib", "gzip", "lzma", "traceback", "doctest",
         "optparse", "types", "xml.dom.minidom", "mimetypes", "timeit", "cmd", "fileinput", "getopt")


def module_text(name: str) -> str:
    return pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext)


def write_jsonl(path: Path, modules) -> int:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for name in modules:
            f.write(json.dumps({"text": module_text(name), "module": name}) + "\n")
    tmp.replace(path)
    return len(modules)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    overlap = set(HELDOUT) & set(TRAIN)
    assert not overlap, overlap
    n_train = write_jsonl(out / "train.jsonl", TRAIN)
    n_held = write_jsonl(out / "heldout.jsonl", HELDOUT)
    print(f"{n_train} training documents -> {out / 'train.jsonl'}; {n_held} held-out -> {out / 'heldout.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
