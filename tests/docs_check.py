"""The static half of tests/test_docs.py: what a documentation block that cannot run here must still get right.

Run in ONE child process for all such blocks (`python -m tests.docs_check IN.json OUT.json`): resolving the
blocks' imports loads torch and megatron-core, which the pytest process itself should not import before the
CPU backend is set up (docs/cpu_backend.md) and which costs ~5 s once instead of once per block.

IN.json: a list of blocks {"id", "lang", "code", "line"} ("line": the markdown line of the block's first code
line); OUT.json: {id: [problem, ...]}, each problem prefixed with the markdown file's line.

Python blocks: the block parses; every import resolves (the module imports, `from x import y` names exist);
every name the block uses is defined, imported or a builtin; every call of an imported function or class binds
to its signature (argument count and keyword names: a renamed keyword fails here).

Shell blocks, command by command (through srun/mpiexec/mpirun/sbatch/torchrun to the command they start):
- `harpe-*` (console scripts from setup.py), `python -m megatron_harpe...`, `python tools/*.py`: the program
  is started up to its argparse parser (no work is done: parsing is intercepted), and the block's arguments are
  parsed by that parser - flags exist, values have the type and choice the program accepts, required ones are
  given. A command with `...` (or `[optional ...]`) elided is checked flag by flag instead.
- `dotted.key=value` overrides (harpe-train's positional ones, harpe-sweep's --set, harpe-plan's, the
  OVERRIDES of slurm/train.sbatch) name real config keys (megatron_harpe/config/schema.py); with a config
  file of this repository, the config loads with them as harpe-train would load it.
- slurm/train.sbatch's config and overrides, slurm/convert.sbatch's harpe-convert arguments, and the
  PREPROCESS_ARGS given to slurm/preprocess.sbatch or submit_preprocess.sh, as those scripts pass them on.
- `torchrun` flags (torch's own parser), `python -c CODE` (as a Python block), `make TARGET` (the Makefile
  has the target).
- every path into this repository (examples/, slurm/, tools/, requirements/, docs/, tests/, megatron_harpe/)
  exists; `${var}`/`<placeholder>` parts match anything.
"""
from __future__ import annotations

import argparse
import ast
import builtins
import contextlib
import dataclasses
import glob
import importlib
import inspect
import io
import json
import os
import re
import runpy
import shlex
import sys
import typing
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
REPO_DIRS = ("examples", "slurm", "tools", "requirements", "docs", "tests", "megatron_harpe")
PLACEHOLDER = "__PLACEHOLDER__"
PYTHON = re.compile(r"^(.*/)?python(3(\.\d+)?)?$")
# commands that start another command: the first argument that is a program is what they start
WRAPPERS = {"srun", "mpiexec", "mpirun", "salloc", "nohup", "time", "env", "exec"}
SHELL_KEYWORDS = {"do", "done", "then", "else", "fi", "{", "}", "!"}
SEPARATORS = {";", "&&", "||", "|", "&", "(", ")", ";;", "|&"}
REDIRECTS = {">", ">>", "<", ">&", "&>", ">|", "<<", "<<<"}


# ------------------------------------------------------------------------------------------------ python
def check_python(code: str, line_of) -> list[str]:
    """Problems of a Python snippet; line_of(n) gives the markdown line of the snippet's line n."""
    try:
        tree = ast.parse(code)
    except SyntaxError as err:
        return [f"{line_of(err.lineno or 1)}: does not parse: {err.msg}"]
    problems: list[str] = []
    bound: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                module = _import(alias.name, problems, line_of(node.lineno))
                if module is not None:
                    bound[alias.asname or alias.name.split(".")[0]] = (
                        module if alias.asname else importlib.import_module(alias.name.split(".")[0]))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                problems.append(f"{line_of(node.lineno)}: relative import in a documentation example")
                continue
            module = _import(node.module, problems, line_of(node.lineno))
            if module is None:
                continue
            for alias in node.names:
                if alias.name == "*":
                    continue
                if hasattr(module, alias.name):
                    bound[alias.asname or alias.name] = getattr(module, alias.name)
                    continue
                try:
                    bound[alias.asname or alias.name] = importlib.import_module(f"{node.module}.{alias.name}")
                except ImportError:
                    problems.append(f"{line_of(node.lineno)}: cannot import name {alias.name!r} from {node.module}")
    problems += _undefined_names(tree, line_of)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            problems += _check_call(node, bound, code, line_of)
    return problems


def _import(name: str, problems: list[str], where: str):
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return importlib.import_module(name)
    except Exception as err:  # noqa: BLE001 - any failure to import is the problem to report
        problems.append(f"{where}: import {name}: {type(err).__name__}: {err}")
        return None


def _undefined_names(tree: ast.AST, line_of) -> list[str]:
    """Names read but never bound anywhere in the snippet (scopes merged: lenient, never a false alarm)."""
    defined = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            defined.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            defined.add(node.name)
    seen, problems = set(), []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in defined
                and node.id not in seen):
            seen.add(node.id)
            problems.append(f"{line_of(node.lineno)}: {node.id!r} is used but never defined or imported")
    return problems


def _resolve(expr: ast.expr, bound: dict, problems: list[str], where: str):
    if isinstance(expr, ast.Name):
        return bound.get(expr.id, _MISSING)
    if isinstance(expr, ast.Attribute):
        base = _resolve(expr.value, bound, problems, where)
        if base is _MISSING:
            return _MISSING
        if not hasattr(base, expr.attr):
            if inspect.ismodule(base) or inspect.isclass(base):
                problems.append(f"{where}: {ast.unparse(expr)}: {getattr(base, '__name__', base)} has no "
                                f"attribute {expr.attr!r}")
            return _MISSING
        return getattr(base, expr.attr)
    return _MISSING


_MISSING = object()


def _check_call(node: ast.Call, bound: dict, code: str, line_of) -> list[str]:
    problems: list[str] = []
    where = line_of(node.lineno)
    func = _resolve(node.func, bound, problems, where)
    if func is _MISSING or any(isinstance(a, ast.Starred) for a in node.args) or any(
            k.arg is None for k in node.keywords):
        return problems
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # builtins and C functions without a signature
        return problems
    try:
        signature.bind(*[None] * len(node.args), **{k.arg: None for k in node.keywords})
    except TypeError as err:
        problems.append(f"{where}: {ast.unparse(node.func)}(...) does not take these arguments: {err} "
                        f"(its signature: {ast.unparse(node.func)}{signature})")
    return problems


# ------------------------------------------------------------------------------------------------- shell
def logical_lines(code: str, first_line: int) -> list[tuple[int, str]]:
    """(markdown line, text) of each command line: continuations joined, `<placeholder>`s replaced."""
    out, pending, start = [], "", None
    for offset, raw in enumerate(code.split("\n")):
        if start is None:
            start = first_line + offset
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        text = pending + raw
        pending = ""
        text = re.sub(r"<[A-Za-z][\w .,/-]*>", PLACEHOLDER, text)       # <jobid>, <this repository>
        text = re.sub(r"\s\d*>&\d+", " ", text)                        # 2>&1
        out.append((start, text))
        start = None
    return out


def commands(text: str) -> list[tuple[dict, list[str]]]:
    """The simple commands of one line: (environment assignments, words), comments and redirections dropped."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|()<>")
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError as err:  # unbalanced quotes
        raise ValueError(f"cannot be split into words: {err}") from None
    out, words, skip_next = [], [], False
    for token in tokens + [";"]:
        if skip_next:
            skip_next = False
            continue
        if token in REDIRECTS:
            skip_next = True
            continue
        if token in SEPARATORS:
            if words:
                out.append(words)
            words = []
            continue
        words.append(token)
    result = []
    for words in out:
        while words and words[0] in SHELL_KEYWORDS:
            words = words[1:]
        env = {}
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
            key, _, value = words[0].partition("=")
            env[key] = value
            words = words[1:]
        if words and words[0] not in ("for", "if", "while", "until", "case"):
            result.append((env, words))
    return result


def check_shell(code: str, first_line: int) -> list[str]:
    problems: list[str] = []
    for line, text in logical_lines(code, first_line):
        try:
            cmds = commands(text)
        except ValueError as err:
            problems.append(f"{line}: {err}")
            continue
        for env, words in cmds:
            problems += [f"{line}: {p}" for p in _check_paths(words + list(env.values()))]
            problems += [f"{line}: {p}" for p in check_command(words, env)]
    return problems


def _check_paths(words: list[str]) -> list[str]:
    problems = []
    for word in words:
        for candidate in {word, word.split("=", 1)[-1]}:
            candidate = candidate.strip("'\"[],")
            first = candidate.split("/", 1)[0]
            if not (candidate == "Makefile" or (first in REPO_DIRS and "/" in candidate)):
                continue
            pattern = re.sub(r"\$\{?\w+\}?|" + PLACEHOLDER, "*", candidate)
            if not glob.glob(str(REPO_ROOT / pattern)):
                problems.append(f"{candidate}: no such file in this repository")
    return problems


def _is_program(word: str) -> bool:
    base = os.path.basename(word)
    return (base.startswith("harpe-") or bool(PYTHON.match(word)) or base == "torchrun"
            or word.endswith((".py", ".sbatch", ".sh")))


def check_command(words: list[str], env: dict) -> list[str]:
    prog, args = words[0], words[1:]
    base = os.path.basename(prog)
    if base in WRAPPERS:
        inner = next((i for i in range(1, len(words)) if _is_program(words[i])), None)
        return check_command(words[inner:], env) if inner else []
    if base == "sbatch":
        script = next((i for i in range(1, len(words)) if words[i].endswith((".sbatch", ".sh"))), None)
        return _check_batch_script(words[script], words[script + 1:], env) if script else []
    if prog.endswith((".sbatch", ".sh")):
        return _check_batch_script(prog, args, env)
    if base == "torchrun":
        return _check_torchrun(args, env)
    if PYTHON.match(prog):
        return _check_python_command(args, env)
    if base.startswith("harpe-"):
        entry = console_scripts().get(base)
        if entry is None:
            return [f"{base}: no such console script in setup.py"]
        module, func = entry
        return check_program(base, lambda: getattr(importlib.import_module(module), func)(), args)
    if base == "make":
        targets = make_targets()
        return [f"make {t}: the Makefile has no target {t!r}" for t in args
                if not t.startswith("-") and "=" not in t and t not in targets]
    return []


def _check_python_command(args: list[str], env: dict) -> list[str]:
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] not in ("-m", "-c"):
        i += 2 if args[i] in ("-W", "-X") else 1
    if i >= len(args):
        return []
    if args[i] == "-c" and i + 1 < len(args):
        return check_python(args[i + 1], lambda n: "python -c")
    if args[i] == "-m" and i + 1 < len(args):
        module, rest = args[i + 1], args[i + 2:]
        if module == "torch.distributed.run":
            return _check_torchrun(rest, env)
        if not module.startswith("megatron_harpe"):
            return []
        return check_program(f"python -m {module}", lambda: runpy.run_module(module, run_name="__main__",
                                                                           alter_sys=True), rest)
    script, rest = args[i], args[i + 1:]
    if script.startswith("tools/") and script.endswith(".py") and (REPO_ROOT / script).is_file():
        return check_program(f"python {script}", lambda: runpy.run_path(str(REPO_ROOT / script),
                                                                        run_name="__main__"), rest)
    return []


def _check_torchrun(args: list[str], env: dict) -> list[str]:
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    parser.prog = "torchrun"
    ns, error = parse(parser, args)
    if error:
        return [f"torchrun: {error}"]
    if ns is None:
        return []
    if ns.module:
        inner = ["python", "-m", ns.training_script]
    elif ns.no_python:
        inner = [ns.training_script]
    else:
        inner = ["python", ns.training_script]
    return check_command(inner + list(ns.training_script_args), env)


def _check_batch_script(script: str, args: list[str], env: dict) -> list[str]:
    name = os.path.basename(script)
    if name == "train.sbatch":
        config = args[0] if args else env.get("CONFIG")
        overrides = args[1:] + shlex.split(env.get("OVERRIDES", ""))
        return check_config(config, overrides, "slurm/train.sbatch")
    if name == "convert.sbatch":
        return check_command(["harpe-convert", *args], env)
    if name in ("preprocess.sbatch", "submit_preprocess.sh") and env.get("PREPROCESS_ARGS"):
        return check_command(["harpe-preprocess", *shlex.split(env["PREPROCESS_ARGS"]), "..."], env)
    return []


# --------------------------------------------------------------------------------------- programs, parsers
class _Reached(BaseException):
    """Raised where a program would parse its arguments (BaseException: no `except Exception` swallows it)."""

    def __init__(self, parser: argparse.ArgumentParser, args: list[str]):
        super().__init__()
        self.parser, self.args = parser, args


def reach_parser(invoke, argv0: str, argv: list[str]):
    """Start a program up to the argparse parser that would read `argv`; (parser, its args) or an error."""
    original = argparse.ArgumentParser.parse_known_args

    def stop(self, args=None, namespace=None):
        raise _Reached(self, list(sys.argv[1:] if args is None else args))

    saved_argv = sys.argv
    sys.argv = [argv0, *argv]
    argparse.ArgumentParser.parse_known_args = stop
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            invoke()
    except _Reached as reached:
        return reached.parser, reached.args, None
    except SystemExit as err:
        return None, None, f"exited ({err.code}) before parsing its arguments"
    except Exception as err:  # noqa: BLE001 - a program that cannot start is the problem to report
        return None, None, f"cannot start: {type(err).__name__}: {err}"
    finally:
        argparse.ArgumentParser.parse_known_args = original
        sys.argv = saved_argv
    return None, None, "returned without parsing its arguments"


def parse(parser: argparse.ArgumentParser, args: list[str]):
    """(namespace, None), or (None, the parser's error message); (None, None) for --help."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            return parser.parse_args(args), None
    except SystemExit as exit_:
        if exit_.code in (0, None):
            return None, None
        lines = [ln for ln in err.getvalue().strip().splitlines() if ln.strip()]
        return None, lines[-1] if lines else f"exit {exit_.code}"
    except Exception as error:  # noqa: BLE001 - parsers that raise their own bad-input errors
        return None, f"{type(error).__name__}: {error}"


def check_program(name: str, invoke, args: list[str]) -> list[str]:
    elided = "..." in args
    args = _drop_synopsis(args)
    parser, parsed_args, error = reach_parser(invoke, name.split()[-1], args)
    if error:
        return [f"{name}: {error}"]
    if elided:
        return [f"{name}: {p}" for p in flags_exist(parser, parsed_args)]
    ns, error = parse(parser, parsed_args)
    if error:
        return [f"{name} {' '.join(shlex.quote(a) for a in args)}: {error}"]
    if ns is None:
        return []
    config, overrides = _config_and_overrides(vars(ns))
    return check_config(config, overrides, name) if overrides or config else []


def _drop_synopsis(args: list[str]) -> list[str]:
    """`[optional words ...]` groups and `...` are the synopsis' own, not arguments."""
    out, depth = [], 0
    for arg in args:
        if arg == "...":
            continue
        if depth or arg.startswith("["):
            depth += arg.count("[") - arg.count("]")
            continue
        out.append(arg)
    return out


def flags_exist(parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    positional = next((a for a in args if not a.startswith("-")), None)
    if sub is not None and positional in sub.choices:
        parser = sub.choices[positional]
    known = set(parser._option_string_actions)
    return [f"no option {a.split('=')[0]} (known: {', '.join(sorted(o for o in known if o.startswith('--')))})"
            for a in args if a.startswith("-") and not re.match(r"^-\d", a) and a.split("=")[0] not in known]


def _config_and_overrides(values: dict):
    config = values.get("config")
    overrides = []
    for key in ("overrides", "set", "inputs"):
        for item in values.get(key) or []:
            if isinstance(item, str) and "=" in item:
                overrides.append(item)
            elif key == "inputs" and "config" in values and config is None:
                config = item
    return config, overrides


def check_config(config: str | None, overrides: list[str], who: str) -> list[str]:
    """Every override names a config key; a config of this repository loads with them."""
    overrides = [o for o in _drop_synopsis(overrides) if PLACEHOLDER not in o.split("=")[0]]
    problems = [f"{who}: {p}" for o in overrides if (p := unknown_key(o))]
    if problems or not config or PLACEHOLDER in config or not (REPO_ROOT / config).is_file():
        return problems
    from megatron_harpe.config.loader import ConfigError, load_config

    try:
        with _cwd(REPO_ROOT):
            load_config(config, overrides)
    except ConfigError as err:
        problems.append(f"{who}: {config} {' '.join(overrides)}: {err}")
    return problems


def unknown_key(override: str) -> str | None:
    from megatron_harpe.config.loader import REMOVED_KEYS
    from megatron_harpe.config.schema import Config

    if "=" not in override:
        return f"{override!r} is not a dotted.key=value override"
    key = override.split("=", 1)[0].strip()
    if key in REMOVED_KEYS:
        return f"{key} was removed: {REMOVED_KEYS[key]}"
    cls, parts = Config, key.split(".")
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            section = ".".join(parts[:i]) or "the top level"
            return f"{key}: no config key {'.'.join(parts[:i + 1])} (known under {section}: {', '.join(names)})"
        hint = typing.get_type_hints(cls)[part]
        nested = [a for a in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(a)]
        if not nested:
            return None  # a value (also a dict or a list): the rest of the key is inside it
        cls = nested[0]
    return None


@contextlib.contextmanager
def _cwd(path: Path):
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


_SCRIPTS: dict | None = None


def console_scripts() -> dict[str, tuple[str, str]]:
    """harpe-* -> (module, function), read from setup.py (the source, not a possibly stale install)."""
    global _SCRIPTS
    if _SCRIPTS is None:
        text = (REPO_ROOT / "setup.py").read_text()
        _SCRIPTS = {m[0]: (m[1], m[2]) for m in re.findall(r'"(harpe-[\w-]+)=([\w.]+):(\w+)"', text)}
    return _SCRIPTS


def make_targets() -> set[str]:
    text = (REPO_ROOT / "Makefile").read_text()
    return {t for line in re.findall(r"^([\w .-]+?)\s*:(?!=)", text, re.M) for t in line.split()}


# ------------------------------------------------------------------------------------------------- main
def check_block(block: dict) -> list[str]:
    path, first = block["id"].rsplit(":", 1)[0], block["line"]
    if block["lang"] == "python":
        return check_python(block["code"], lambda n: f"{path}:{first + n - 1}")
    return [f"{path}:{p}" for p in check_shell(block["code"], first)]


def main(argv: list[str]) -> int:
    os.chdir(REPO_ROOT)
    sys.path.insert(0, str(REPO_ROOT))
    from megatron_harpe.cli import silence_known_warnings

    silence_known_warnings()
    blocks = json.loads(Path(argv[0]).read_text())
    results = {}
    for block in blocks:
        try:
            results[block["id"]] = check_block(block)
        except Exception as err:  # noqa: BLE001 - a checker bug shows as the block's failure, with its cause
            results[block["id"]] = [f"the checker failed: {type(err).__name__}: {err}"]
    Path(argv[1]).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
