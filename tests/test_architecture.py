"""The package's shape, kept from regressing (docs/architecture.md explains the layers).

Imports are read from the source (every `import` statement, also those inside functions), not by
importing, so a lazy import that breaks the layer rule is caught as well.
"""
import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_harpe"

#: Bottom-up. A module may import modules of its own package and of the layers below its own;
#: packages that share a layer do not import each other.
LAYERS = [
    {"__init__", "cli", "files", "compat", "backends", "profile_ranges", "environment"},
    {"rope"},
    {"config"},
    {"data"},
    {"parallel"},
    {"models"},
    {"training"},
    {"convert", "evaluation", "sweeps", "planning"},
    {"preflight"},  # checks a run with all of the above
    {"train", "demo"},  # entry points: anything below
]
LAYER_OF = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _imports(path: Path, module: str):
    """megatron_harpe modules `module` imports (`from pkg import mod` counts as importing pkg.mod;
    relative imports are resolved)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("megatron_harpe"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative (hf_modeling/ must be: it ships inside exported HF directories)
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                anchor = package[: len(package) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.startswith("megatron_harpe"):
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
    known = {m for m, _ in _modules()}
    return {name for name in found if name in known}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_package_has_a_layer():
    units = {_unit(m) for m, _ in _modules()}
    assert units <= set(LAYER_OF), f"place {sorted(units - set(LAYER_OF))} in LAYERS and docs/architecture.md"


def test_imports_go_down_the_layers():
    violations = []
    for module, path in _modules():
        src = _unit(module)
        for target in _imports(path, module):
            dst = _unit(target)
            if dst != src and not LAYER_OF[dst] < LAYER_OF[src]:
                violations.append(f"{module} imports {target} ({src}: layer {LAYER_OF[src]}, "
                                  f"{dst}: layer {LAYER_OF[dst]})")
    assert not violations, "layer rule broken:\n" + "\n".join(violations)


def test_no_import_circles_between_modules():
    """Function-level imports count too: hiding a circle inside a function keeps it from failing at
    import time, not from tying the modules together."""
    graph = defaultdict(set)
    for module, path in _modules():
        graph[module] = {t for t in _imports(path, module) if t != module}
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            # a package's __init__ re-exporting its own modules is not a circle worth the name
            if len(component) > 1 and not all(c.startswith(min(component)) for c in component):
                cycles.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import circles: {cycles}"


def test_the_config_layer_imports_neither_torch_nor_megatron_core():
    """A bad config is reported (and --print-config answers) before torch or megatron-core loads."""
    code = ("import sys\n"
            "from megatron_harpe.config import loader, model, position_record, schema, stages, validate\n"
            "cfg = loader.load_config('examples/tiny/harpe.yaml')\n"
            "validate.validate_config(cfg, 2)\n"
            "print(sorted(m for m in ('torch', 'megatron') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_every_megatron_core_workaround_is_verified_on_the_installed_release():
    from megatron_harpe import compat

    unverified = compat.unverified_workarounds()
    assert not unverified, (f"megatron-core {compat.installed_version()} is installed; re-check "
                            f"{[w.name for w in unverified]} (megatron_harpe/compat.py) and add the version")
    assert compat.unverified_workarounds("0.99.0") == list(compat.WORKAROUNDS)


def _config_fields(cls, prefix=""):
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        inner = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        nested = hint if dataclasses.is_dataclass(hint) else (inner[0] if inner else None)
        if nested is not None:
            yield from _config_fields(nested, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f.name


def test_every_config_key_is_read_somewhere():
    """A key the code never reads is a setting that silently does nothing: remove it instead
    (config/loader.py REMOVED_KEYS tells users who still set it)."""
    import re

    from megatron_harpe.config.schema import Config

    sources = [(p, p.read_text()) for p in PACKAGE.rglob("*.py")]
    unread = []
    for dotted, name in _config_fields(Config):
        use = re.compile(rf"(\.{name}\b|[\"']{name}[\"'])")
        definition = re.compile(rf"^\s+{name}\s*:", re.M)
        if not any(use.search(definition.sub("", text)) for _, text in sources):
            unread.append(dotted)
    assert not unread, f"config keys nothing reads: {unread}"
