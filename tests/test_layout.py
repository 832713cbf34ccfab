"""The package's layout rules, read statically from the source: no import cycles, imports at the
top of files (laziness only in commands/, where it keeps `unclip-jax --help` fast), model and
diffusion code free of optimizers, checkpoints, configs and files, and a light `--help`."""
import ast
import os
import subprocess
import sys
from collections import defaultdict

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "unclip_jax")


def _modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


MODULES = _modules()


def _targets(module: str, node) -> list[str]:
    """The modules an import statement names (unclip_jax ones resolved to a module we have)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            parts = module.split(".")
            if not MODULES[module].endswith("__init__.py"):
                parts = parts[:-1]
            parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join(parts + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    out = []
    for name in names:
        while name not in MODULES and "." in name and name.startswith("unclip_jax"):
            name = name.rsplit(".", 1)[0]
        out.append(name)
    return out


def _optional(node, parents) -> bool:
    """An import inside ``try: ... except ImportError`` (an optional dependency)."""
    for p in parents.get(id(node), ()):
        if isinstance(p, ast.Try) and any(
                h.type is not None and "ImportError" in ast.unparse(h.type) for h in p.handlers):
            return True
    return False


def _scan():
    edges, nested, external = defaultdict(set), [], defaultdict(set)
    for module, path in MODULES.items():
        tree = ast.parse(open(path, encoding="utf-8").read())
        parents: dict[int, list] = {}

        def walk(node, chain):
            for child in ast.iter_child_nodes(node):
                parents[id(child)] = chain
                walk(child, chain + [child])

        walk(tree, [])
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            chain = parents.get(id(node), [])
            in_function = any(isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                              for p in chain)
            if in_function and not _optional(node, parents):
                nested.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
            for target in _targets(module, node):
                if target in MODULES and target != module:
                    edges[module].add(target)
                external[module].add(target.split(".")[0])
    return edges, nested, external


EDGES, NESTED, EXTERNAL = _scan()


def _cycles(edges) -> list[list[str]]:
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(MODULES):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_between_modules():
    assert _cycles(EDGES) == []


def test_no_two_way_ties_between_subpackages():
    def sub(m):
        parts = m.split(".")
        return parts[1] if len(parts) > 2 else None

    ties = defaultdict(set)
    for a, targets in EDGES.items():
        for b in targets:
            if sub(a) and sub(b) and sub(a) != sub(b):
                ties[sub(a)].add(sub(b))
    both = sorted({tuple(sorted((a, b))) for a in ties for b in ties[a] if a in ties.get(b, ())})
    assert both == []


def test_imports_at_the_top_except_in_commands():
    lazy = ("unclip_jax.commands.", "unclip_jax.commands:")
    offenders = [n for n in NESTED if not n.startswith(lazy)]
    assert offenders == []


@pytest.mark.parametrize("package", ["unclip_jax.models", "unclip_jax.diffusion"])
def test_models_and_diffusion_know_nothing_of_training_or_files(package):
    banned = {"optax", "orbax", "ml_collections", "tensorflow", "etils"}
    ours = ("unclip_jax.train", "unclip_jax.io", "unclip_jax.config", "unclip_jax.pipeline",
            "unclip_jax.commands", "unclip_jax.data")
    bad = []
    for module in MODULES:
        if module == package or module.startswith(package + "."):
            bad += [f"{module} -> {t}" for t in EXTERNAL[module] if t in banned]
            bad += [f"{module} -> {t}" for t in EDGES[module] if t.startswith(ours)]
    assert bad == []


def test_cli_import_and_help_stay_light():
    code = ("import sys, unclip_jax.cli; heavy = [m for m in ('jax', 'tensorflow', 'flax', "
            "'torch') if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run([sys.executable, "-m", "unclip_jax.cli", "--help"], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0 and "generate" in out.stdout, out.stderr
