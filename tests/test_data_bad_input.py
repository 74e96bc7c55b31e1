"""Bad input for harpe-preprocess / harpe-upsample: every case a clear error or a counted skip,
and never a .bin/.idx pair that looks valid unless the run completed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from megatron_harpe.data import indexed, preprocess, upsample
from megatron_harpe.data.indexed import IndexedDatasetWriter, read_index
from megatron_harpe.data.tokenizer import load_tokenizer
from tests.data_fixtures import *  # noqa: F401,F403

REPO = Path(__file__).resolve().parents[1]
GOOD = [{"text": "The first document is short."}, {"text": "A second one, with more words in it."},
        {"text": "Third: the pass key is 71432. Remember it."}]


def _write(path: Path, lines: list) -> Path:
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (json.dumps(line) if isinstance(line, dict) else line).encode())
            f.write(b"\n")
    return path


def _run(capsys, spm_model, inp, prefix, *extra):
    rc = preprocess.main(["--input", *([str(i) for i in inp] if isinstance(inp, list) else [str(inp)]),
                          "--tokenizer-type", "sentencepiece", "--tokenizer-model", str(spm_model),
                          "--output-prefix", str(prefix), "--workers", "1", *map(str, extra)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _doc(prefix, i) -> list[int]:
    """Document i read by megatron-core (the dataset must outlive the array: it views its mmap)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    ds = IndexedDataset(str(prefix))
    return ds[i].tolist()


def _outputs(prefix) -> list[str]:
    return sorted(p.name for p in Path(prefix).parent.glob(Path(prefix).name + "*"))


def test_malformed_json_names_file_and_line(tmp_path, capsys, spm_model):
    inp = _write(tmp_path / "in.jsonl", [GOOD[0], GOOD[1], '{"text": "unterminated', GOOD[2]])
    prefix = tmp_path / "out"
    rc, out, err = _run(capsys, spm_model, inp, prefix)
    assert rc == 2
    assert f"{inp}:3: malformed JSON" in err and "--skip-bad-lines" in err
    assert _outputs(prefix) == []                     # nothing written, no leftovers
    rc, out, err = _run(capsys, spm_model, inp, prefix, "--skip-bad-lines")
    assert rc == 0
    assert "3 documents" in out and "1 bad lines (1 malformed JSON)" in out
    assert f"skipped bad line {inp}:3: malformed JSON" in err
    assert read_index(f"{prefix}_text_document")["sequence_lengths"].size == 3


def test_bad_line_numbers_across_blocks_and_files(tmp_path, capsys, spm_model):
    # many lines in tiny blocks: the reported line number is still the file's
    lines = [{"text": f"document number {i}"} for i in range(3000)]
    lines[2500] = "not json at all"
    a = _write(tmp_path / "a.jsonl", [GOOD[0]])
    b = _write(tmp_path / "b.jsonl", lines)
    rc, _, err = _run(capsys, spm_model, [a, b], tmp_path / "o", "--block-mb", "0.0625")
    assert rc == 2 and f"{b}:2501: malformed JSON" in err


def test_missing_key_and_wrong_types(tmp_path, capsys, spm_model):
    inp = _write(tmp_path / "in.jsonl", [GOOD[0], {"content": "no text key"}, {"text": 42}, "[1, 2]", GOOD[1]])
    rc, _, err = _run(capsys, spm_model, inp, tmp_path / "o")
    assert rc == 2 and f"{inp}:2: no key 'text'" in err and "--json-keys" in err
    rc, out, _ = _run(capsys, spm_model, inp, tmp_path / "o", "--skip-bad-lines")
    assert rc == 0
    assert "2 documents" in out and "3 bad lines (1 missing key, 1 not a string, 1 not an object)" in out
    # dotted keys reach into objects
    nested = _write(tmp_path / "nested.jsonl", [{"meta": {"body": "nested text here"}}])
    rc, out, err = _run(capsys, spm_model, nested, tmp_path / "n", "--json-keys", "meta.body")
    assert rc == 0, err
    tok = load_tokenizer("sentencepiece", spm_model)
    assert _doc(tmp_path / "n_meta_body_document", 0) == tok.encode("nested text here")


def test_non_utf8_bytes(tmp_path, capsys, spm_model):
    inp = _write(tmp_path / "in.jsonl", [GOOD[0], b'{"text": "caf\xe9 latin-1 bytes"}', GOOD[1]])
    rc, _, err = _run(capsys, spm_model, inp, tmp_path / "o")
    assert rc == 2 and f"{inp}:2: invalid UTF-8 (byte 0xe9" in err and "--replace-invalid-utf8" in err
    rc, out, _ = _run(capsys, spm_model, inp, tmp_path / "o", "--skip-bad-lines")
    assert rc == 0 and "2 documents" in out and "(1 invalid UTF-8)" in out
    rc, out, _ = _run(capsys, spm_model, inp, tmp_path / "r", "--replace-invalid-utf8")
    assert rc == 0 and "3 documents" in out
    tok = load_tokenizer("sentencepiece", spm_model)
    assert tok.decode(_doc(tmp_path / "r_text_document", 1)) == "caf\ufffd latin-1 bytes"


def test_empty_documents_and_blank_lines(tmp_path, capsys, spm_model):
    inp = _write(tmp_path / "in.jsonl", [GOOD[0], {"text": ""}, "", "   ", GOOD[1], {"text": ""}])
    rc, out, _ = _run(capsys, spm_model, inp, tmp_path / "o", "--append-eod")
    assert rc == 0
    assert "2 documents" in out and "0 bad lines" in out and "2 empty documents skipped" in out
    rc, out, _ = _run(capsys, spm_model, inp, tmp_path / "k", "--keep-empty")
    assert rc == 0
    assert list(read_index(str(tmp_path / "k_text_document"))["sequence_lengths"] == 0) == [False, True, False, True]
    # a file of nothing but empty documents is an error, not an empty dataset
    only = _write(tmp_path / "empty.jsonl", [{"text": ""}, ""])
    rc, _, err = _run(capsys, spm_model, only, tmp_path / "out_e")
    assert rc == 2 and "no documents" in err and _outputs(tmp_path / "out_e") == []


def test_bom_and_crlf_are_fine(tmp_path, capsys, spm_model):
    p = tmp_path / "win.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"text": "first"}\r\n{"text": "second"}\r\n')
    rc, out, err = _run(capsys, spm_model, p, tmp_path / "o")
    assert rc == 0, err and "2 documents" in out


def test_missing_inputs(tmp_path, capsys, spm_model):
    rc, _, err = _run(capsys, spm_model, tmp_path / "nope.jsonl", tmp_path / "o")
    assert rc == 2 and "input file not found" in err
    rc, _, err = _run(capsys, spm_model, str(tmp_path / "*.jsonl"), tmp_path / "o")
    assert rc == 2 and "matches no file" in err
    corrupt = tmp_path / "bad.jsonl.gz"
    corrupt.write_bytes(b"\x1f\x8b\x08\x00" + b"garbage" * 20)
    rc, _, err = _run(capsys, spm_model, corrupt, tmp_path / "o")
    assert rc == 2 and "cannot read input" in err and "bad.jsonl.gz" in err
    assert _outputs(tmp_path / "o") == []


def test_missing_or_unreadable_tokenizer(tmp_path, capsys):
    inp = _write(tmp_path / "in.jsonl", GOOD)
    rc, _, err = _run(capsys, tmp_path / "missing.model", inp, tmp_path / "o")
    assert rc == 2 and "sentencepiece model not found" in err and "missing.model" in err
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"junk" * 100)
    rc, _, err = _run(capsys, junk, inp, tmp_path / "o")
    assert rc == 2 and "is not a sentencepiece model" in err
    assert _outputs(tmp_path / "o") == []


def test_unwritable_output(tmp_path, capsys, spm_model):
    inp = _write(tmp_path / "in.jsonl", GOOD)
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    rc, _, err = _run(capsys, spm_model, inp, blocker / "sub" / "out")
    assert rc == 2 and "cannot create the output directory" in err
    rc, _, err = _run(capsys, spm_model, inp, tmp_path)
    assert rc == 2 and "is a directory" in err
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        rc, _, err = _run(capsys, spm_model, inp, ro / "out")
        assert rc == 2 and "not writable" in err


def test_write_failure_leaves_no_valid_pair(tmp_path, capsys, spm_model, monkeypatch, corpus_jsonl):
    # an earlier complete output exists; the new run fails while writing (disk full)
    prefix = tmp_path / "o"
    assert _run(capsys, spm_model, corpus_jsonl, prefix)[0] == 0
    old = (tmp_path / "o_text_document.bin").read_bytes()
    calls = {"n": 0}
    real = IndexedDatasetWriter.add_documents

    def failing(self, tokens, lengths):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(self, tokens, lengths)

    monkeypatch.setattr(IndexedDatasetWriter, "add_documents", failing)
    rc, _, err = _run(capsys, spm_model, corpus_jsonl, prefix, "--block-mb", "0.1")
    assert rc == 1 and "No space left on device" in err and "no output written" in err
    # the earlier pair is untouched and no incomplete files are left behind
    assert (tmp_path / "o_text_document.bin").read_bytes() == old
    assert _outputs(prefix) == ["o_text_document.bin", "o_text_document.idx"]


def test_commit_never_pairs_new_data_with_an_old_index(tmp_path, monkeypatch):
    prefix = str(tmp_path / "d")
    w = IndexedDatasetWriter(prefix, np.uint16)
    w.add_document([1, 2, 3])
    w.commit()
    w = IndexedDatasetWriter(prefix, np.uint16)
    w.add_document([4, 5, 6, 7, 8])
    real = os.replace

    def crash_before_index(src, dst):
        if dst.endswith(".idx"):
            raise KeyboardInterrupt  # killed between the two renames
        return real(src, dst)

    monkeypatch.setattr(indexed.os, "replace", crash_before_index)
    with pytest.raises(KeyboardInterrupt):
        w.commit()
    # new .bin in place, but no .idx: nothing reads it as a dataset
    assert os.path.exists(prefix + ".bin") and not os.path.exists(prefix + ".idx")


def test_interrupted_run_leaves_no_valid_output(tmp_path, spm_model):
    """A killed run (SIGKILL: no cleanup at all) leaves only files named *.incomplete-*;
    SIGTERM cleans those up too. The input is a FIFO, so the run is mid-way when killed."""
    for sig in (signal.SIGKILL, signal.SIGTERM):
        fifo = tmp_path / f"in-{sig}.jsonl"
        os.mkfifo(fifo)
        prefix = tmp_path / f"out-{int(sig)}"
        proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(fifo),
                                 "--tokenizer-type", "sentencepiece", "--tokenizer-model", spm_model,
                                 "--output-prefix", str(prefix), "--workers", "1", "--block-mb", "0.0625"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        with open(fifo, "w") as f:   # blocks until the tool opens the FIFO
            for i in range(20000):
                f.write(json.dumps({"text": f"document {i} " * 5}) + "\n")
            f.flush()
            deadline = time.time() + 60
            while not list(tmp_path.glob(f"out-{int(sig)}*.incomplete-*")) and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)  # let it process some blocks
            proc.send_signal(sig)
            proc.wait(timeout=60)
        names = _outputs(prefix)
        assert not any(n.endswith((".bin", ".idx")) for n in names), names
        if sig == signal.SIGKILL:
            assert names and all(".incomplete-" in n for n in names)
            indexed.remove_incomplete(str(prefix))
            assert _outputs(prefix) == []
        else:
            assert proc.returncode == 130 and names == []
            assert b"interrupted; no output written" in proc.stderr.read()


def test_usage_errors(tmp_path, capsys, spm_model):
    assert preprocess.main(["--input", "x.jsonl"]) == 2
    assert "error: the following arguments are required" in capsys.readouterr().err
    inp = _write(tmp_path / "in.jsonl", GOOD)
    rc, _, err = _run(capsys, spm_model, inp, tmp_path / "o", "--split-sentences")
    assert rc == 2 and "not supported" in err


def test_upsample_bad_input(tmp_path, capsys, spm_model):
    inp = _write(tmp_path / "in.jsonl", [{"text": "a b c", "source": "x"}, {"text": "d e f"}, '{"text": ',
                                         {"text": "g h i", "source": "y"}])
    base = ["--tokenizer-type", "sentencepiece", "--tokenizer-model", spm_model, "--seq-length", "4",
            "--workers", "0", "--output-prefix", str(tmp_path / "u")]
    assert upsample.main(["--input", str(inp), "--source-key", "source", *base]) == 2
    err = capsys.readouterr().err
    assert f"{inp}:2: no source key 'source'" in err
    assert upsample.main(["--input", str(inp), "--source-key", "source", "--skip-bad-lines", "--keep-prob", "1",
                          *base]) == 0
    out = capsys.readouterr().out
    assert "2 bad lines" in out
    report = json.loads((tmp_path / "u.report.json").read_text())
    assert report["bad_lines"] == 2 and set(report["per_source"]) == {"x", "y"}
    # a source that keeps nothing cannot keep its share: a clear error
    assert upsample.main(["--input", str(inp), "--source-key", "source", "--skip-bad-lines", "--keep-prob", "0",
                          *base[:-1], str(tmp_path / "z")]) == 2
    assert "keeps no document" in capsys.readouterr().err
    assert not list(tmp_path.glob("z*"))
    assert upsample.main(["--source", "oops", *base]) == 2
    assert "NAME=GLOB" in capsys.readouterr().err
    assert upsample.main(["--source", f"x={inp}", "--input", str(inp), *base]) == 2
    assert "without --input" in capsys.readouterr().err
    assert upsample.main(base) == 2
    assert "give the inputs" in capsys.readouterr().err


def test_sigterm_handling_is_scoped_to_the_tool_and_its_own_process():
    """SIGTERM raises KeyboardInterrupt only while a tool runs, and only in the process that runs it:
    a worker forked from it (multiprocessing "fork") that is terminated before its initializer ran
    must exit, not raise into its copy of the caller's stack and go on running the caller's code
    (seen as a pool worker that went on running the rest of the test session)."""
    from megatron_harpe.data.cli_errors import sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with sigterm_as_interrupt():
        pid = os.fork()
        if pid == 0:  # the child: a forked worker before its initializer
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            except BaseException:
                os._exit(99)  # raised into the caller's code: the bug
            os._exit(98)
        _, status = os.waitpid(pid, 0)
        with pytest.raises(KeyboardInterrupt):  # the tool's own process: Ctrl-C's cleanup runs
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before  # restored for whoever called the tool in-process


# ----------------------------------------------------------------------------- the error contract, as a user meets it
#
# Run as commands (a subprocess each): what the terminal shows, worker processes included. Every bad
# input: exit code 2, one message naming the input, no traceback, no output (files or directories).

def _cli(module: str, *argv, env=None):
    proc = subprocess.run([sys.executable, "-m", module, *map(str, argv)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def _assert_one_clean_error(rc, err, *names):
    assert rc == 2, err
    assert "Traceback" not in err and "RemoteTraceback" not in err, err
    assert len([line for line in err.splitlines() if ": error:" in line]) == 1, err
    for name in names:
        assert str(name) in err, (name, err)


BAD_DATA = {  # case -> (lines of the input, what the message says)
    "non-string text": ([GOOD[0], {"text": 42}, GOOD[1]], ":2: key 'text' holds an int, not a string"),
    "null text": ([GOOD[0], {"text": None}], ":2: key 'text' holds a NoneType, not a string"),
    "list text": ([{"text": ["a", "b"]}], ":1: key 'text' holds a list, not a string"),
    "lone surrogate": ([GOOD[0], '{"text": "bad \\ud800 half"}'], ":2: key 'text' holds a lone surrogate"),
    "malformed JSON": ([GOOD[0], '{"text": "unterminated'], ":2: malformed JSON"),
    "not an object": ([GOOD[0], "[1, 2]"], ":2: a JSON list, not an object"),
    "missing key": ([GOOD[0], {"body": "x"}], ":2: no key 'text'"),
    "invalid UTF-8": ([GOOD[0], b'{"text": "caf\xe9"}'], ":2: invalid UTF-8"),
    "empty file": ([], "no documents in"),
    "only empty documents": ([{"text": ""}, "", "  "], "no documents in"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_preprocess_bad_data_with_workers_is_one_message(tmp_path, spm_model, case):
    """--workers 2: a bad line found in a worker process reaches the user as the one message (issue 13: the
    right message used to come after a worker's traceback)."""
    lines, message = BAD_DATA[case]
    inp = _write(tmp_path / "in.jsonl", lines)
    out_dir = tmp_path / "new" / "sub"
    rc, out, err = _cli("megatron_harpe.data.preprocess", "--input", inp, "--tokenizer-type", "sentencepiece",
                        "--tokenizer-model", spm_model, "--output-prefix", out_dir / "p", "--workers", 2,
                        "--no-progress")
    _assert_one_clean_error(rc, err, inp, message)
    assert out == "" and not (tmp_path / "new").exists()  # not even the output directory


def test_preprocess_lone_surrogate_can_be_replaced_or_skipped(tmp_path, capsys, spm_model):
    inp = _write(tmp_path / "in.jsonl", [GOOD[0], '{"text": "bad \\ud800 half"}'])
    rc, out, _ = _run(capsys, spm_model, inp, tmp_path / "r", "--replace-invalid-utf8")
    assert rc == 0 and "2 documents" in out
    tok = load_tokenizer("sentencepiece", spm_model)
    assert tok.decode(_doc(tmp_path / "r_text_document", 1)) == "bad \ufffd half"
    rc, out, _ = _run(capsys, spm_model, inp, tmp_path / "s", "--skip-bad-lines")
    assert rc == 0 and "1 documents" in out and "(1 invalid UTF-8)" in out


@pytest.mark.parametrize("flags, message", [
    (["--workers", "-1"], "--workers -1"),
    (["--block-mb", "0"], "--block-mb 0"),
    (["--log-interval", "0"], "--log-interval 0"),
    (["--workers", "two"], "--workers"),
])
def test_preprocess_bad_runtime_flags(tmp_path, spm_model, flags, message):
    inp = _write(tmp_path / "in.jsonl", GOOD)
    rc, _, err = _cli("megatron_harpe.data.preprocess", "--input", inp, "--tokenizer-type", "sentencepiece",
                      "--tokenizer-model", spm_model, "--output-prefix", tmp_path / "new" / "p", *flags)
    _assert_one_clean_error(rc, err, message)
    assert not (tmp_path / "new").exists()


def test_debug_and_verbose_are_the_contracts_flags(tmp_path, spm_model):
    inp = _write(tmp_path / "in.jsonl", [GOOD[0], {"text": 42}])
    base = ["--input", inp, "--tokenizer-type", "sentencepiece", "--tokenizer-model", spm_model,
            "--output-prefix", tmp_path / "o", "--workers", 2, "--no-progress"]
    rc, _, err = _cli("megatron_harpe.data.preprocess", *base, "--debug")
    assert rc == 2 and "holds an int" in err and "Traceback" in err
    rc, _, err = _cli("megatron_harpe.data.preprocess", *base, env={"HARPE_DEBUG": "1"})
    assert rc == 2 and "Traceback" in err
    rc, _, err = _cli("megatron_harpe.data.preprocess", *base, "--verbose")
    _assert_one_clean_error(rc, err, "holds an int")
    for module in ("megatron_harpe.data.preprocess", "megatron_harpe.data.upsample", "megatron_harpe.data.merge",
                   "megatron_harpe.data.train_tokenizer"):
        rc, out, _ = _cli(module, "--help")
        assert rc == 0 and "--debug" in out and "--verbose" in out and "HARPE_DEBUG" in out, module


UPSAMPLE_BAD = {  # case -> (lines, extra flags, what the message says (input named when it is about data))
    "non-string text": ([{"text": "a b c", "source": "x"}, {"text": 7, "source": "y"}], ["--source-key", "source"],
                        ":2: key 'text' holds an int, not a string"),
    "source holds a dict": ([{"text": "a b c", "source": "x"}, {"text": "d", "source": {"n": 1}}],
                            ["--source-key", "source"], ":2: source key 'source' holds a dict"),
    "lone surrogate in the source": (['{"text": "a b c", "source": "x\\udc00"}'], ["--source-key", "source"],
                                     ":1: source key 'source' holds a lone surrogate"),
    "lone surrogate in the text": (['{"text": "a \\ud800 c", "source": "x"}'], ["--source-key", "source"],
                                   ":1: key 'text' holds a lone surrogate"),
    "empty input": ([], [], "no documents in"),
    "a source keeps nothing": ([{"text": "a b c", "source": "x"}, {"text": "g h i", "source": "y"}],
                               ["--source-key", "source", "--keep-prob", "0"], "keeps no document"),
    "fewer tokens than one sequence": ([{"text": "a b c"}], ["--seq-length", "100000", "--keep-prob", "1"],
                                       "fewer than one sequence"),
}


@pytest.mark.parametrize("case", list(UPSAMPLE_BAD))
def test_upsample_bad_data_with_workers_is_one_message(tmp_path, spm_model, case):
    lines, flags, message = UPSAMPLE_BAD[case]
    inp = _write(tmp_path / "in.jsonl", lines)
    flags = flags if "--seq-length" in flags else ["--seq-length", "4", *flags]
    rc, out, err = _cli("megatron_harpe.data.upsample", "--input", inp, "--tokenizer-type", "sentencepiece",
                        "--tokenizer-model", spm_model, "--output-prefix", tmp_path / "new" / "u", "--workers", 2,
                        "--no-progress", *flags)
    _assert_one_clean_error(rc, err, message, *([inp] if message.startswith(":") or "no documents" in message
                                                 else []))
    assert out == "" and not (tmp_path / "new").exists()


@pytest.mark.parametrize("flags, message", [
    (["--keep-prob", "2"], "--keep-prob 2"),
    (["--target-tokens", "0"], "--target-tokens 0"),
    (["--short-threshold", "-1"], "--short-threshold -1"),
    (["--workers", "-1"], "--workers -1"),
    (["--seq-length", "1"], "--seq-length"),
    (["--target-tokens", "lots"], "--target-tokens"),
])
def test_upsample_bad_flags_fail_before_any_work(tmp_path, spm_model, flags, message):
    inp = _write(tmp_path / "in.jsonl", GOOD)
    base = ["--input", inp, "--tokenizer-type", "sentencepiece", "--tokenizer-model", spm_model,
            "--output-prefix", tmp_path / "new" / "u", "--seq-length", "4"]
    rc, _, err = _cli("megatron_harpe.data.upsample", *base, *flags)
    _assert_one_clean_error(rc, err, message)
    assert not (tmp_path / "new").exists()
