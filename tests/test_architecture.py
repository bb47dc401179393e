"""The layering of docs/architecture.md, checked on the source: who imports whom, file sizes, cycles.

    train_ultimate.py -> tools/ -> training/ -> evaluation/ -> models/, data/, losses/, schedulers/ -> core/

Every import counts, also one inside a function: a lazy import is still a dependency.
"""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("core", "data", "models", "losses", "schedulers", "evaluation", "training", "tools")


def module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[:-len(".py")].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def python_files(package: str) -> list[str]:
    out = []
    for folder, _, names in os.walk(os.path.join(REPO, package)):
        out += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".py")]
    return sorted(out)


def runtime_nodes(tree: ast.AST):
    """Every node but those under ``if TYPE_CHECKING:`` (annotations only, never imported at run time)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in [child, *runtime_nodes(child)])
            continue
        yield node
        yield from runtime_nodes(node)


def imports_of(path: str) -> set:
    """The modules a file imports, anywhere in it (``from a import b`` records ``a`` and ``a.b``)."""
    mods = set()
    package = module_name(path).rsplit(".", 1)[0] if not path.endswith("__init__.py") else module_name(path)
    for node in runtime_nodes(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's own package
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            mods.add(base)
            mods |= {f"{base}.{a.name}" for a in node.names}
    return mods


def project_imports(package: str) -> dict:
    """{file (relative path): the project's top-level packages it imports, but its own}."""
    out = {}
    for path in python_files(package):
        tops = {m.split(".")[0] for m in imports_of(path)}
        out[os.path.relpath(path, REPO)] = tops & (set(PACKAGES) - {package})
    return out


def test_core_imports_no_training_evaluation_or_tools():
    for path, tops in project_imports("core").items():
        assert not tops, (path, tops)


def test_evaluation_imports_core_models_and_data_only():
    for path, tops in project_imports("evaluation").items():
        assert tops <= {"core", "models", "data"}, (path, tops)


@pytest.mark.parametrize("package", ["data", "models", "losses", "schedulers"])
def test_lower_layers_import_only_core(package):
    for path, tops in project_imports(package).items():
        assert tops <= {"core"}, (path, tops)


def test_training_imports_no_tools():
    for path, tops in project_imports("training").items():
        assert "tools" not in tops, (path, tops)


@pytest.mark.parametrize("package", ["training", "core", "tools"])
def test_no_file_over_300_lines(package):
    sizes = {os.path.relpath(p, REPO): sum(1 for _ in open(p)) for p in python_files(package)}
    assert max(sizes.values()) <= 300, {p: n for p, n in sizes.items() if n > 300}


def test_no_import_cycle_between_files():
    """Between the project's modules (a package's __init__ counts as the package)."""
    files = {module_name(p): p for pkg in PACKAGES for p in python_files(pkg)}
    graph = {}
    for mod, path in files.items():
        targets = set()
        for m in imports_of(path):
            while m and m not in files:  # 'training.report.log.format_lr' -> 'training.report.log'
                m = m.rpartition(".")[0]
            while m:  # importing a.b.c runs a/__init__ and a/b/__init__ first
                if m in files and m != mod and not mod.startswith(m + "."):  # its own packages run first
                    targets.add(m)
                m = m.rpartition(".")[0]
        graph[mod] = targets
    state, stack = {}, []

    def visit(mod):
        state[mod] = "open"
        stack.append(mod)
        for nxt in sorted(graph[mod]):
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[mod] = "done"

    for mod in sorted(graph):
        if mod not in state:
            visit(mod)
