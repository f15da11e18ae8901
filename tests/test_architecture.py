"""Issues 17 and 24: the package's import graph, read from the source (ast), not from a running interpreter.

No import cycle between modules or between subpackages (an arrow back up), string imports included (a module
named in a string constant, ``importlib.import_module``, the CLI's ``module:function`` table, pyproject's entry
points); no private name (``_x``) imported from another module; no module over 500 lines.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Package name -> source folder: the source tree is the import tree (pyproject's package discovery).
PACKAGE = {"hf_normalign": REPO / "hf_normalign"}
MAX_LINES = 500


def _modules(roots: dict[str, Path]) -> dict[str, Path]:
    modules = {}
    for package, folder in roots.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [*package.split("."), *path.relative_to(folder).with_suffix("").parts]
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_import_module(node: ast.Call) -> bool:
    func = node.func
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id == "import_module"
    )


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str, int]]:
    """(target module, imported name or "", line) for every import of the package, at any depth (lazy ones too),
    and for every module named by a string: a constant that is a module's dotted name (or ``module:attribute``), and
    an ``import_module`` of a computed name inside a package (it may load any submodule of that package)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, "", node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                is_module = submodule in modules
                found.append((submodule, "", node.lineno) if is_module else (target, alias.name, node.lineno))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            target = node.value.partition(":")[0]
            if target in modules and target != name and "." in target:
                found.append((target, "", node.lineno))
        elif isinstance(node, ast.Call) and _is_import_module(node) and node.args[:1]:
            computed = isinstance(node.args[0], ast.JoinedStr)  # it may load any submodule of this package
            found += [
                (m, "", node.lineno) for m in modules if computed and m.rpartition(".")[0] == package and m != name
            ]
    return [entry for entry in found if entry[0].split(".")[0] in {m.split(".")[0] for m in modules}]


def _graph(roots: dict[str, Path]) -> dict[str, set[str]]:
    """module -> modules whose import runs when it is imported: each target, and the target's enclosing packages
    (their ``__init__`` runs first) except those that enclose the importer itself (already running)."""
    modules = _modules(roots)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        edges = set()
        for target, _, _ in _imports(name, path, modules):
            parts = target.split(".")
            edges |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} - own
        graph[name] = edges - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt] if nxt in stack else [node, nxt]
            if nxt not in state and (found := visit(nxt, [*stack, nxt])):
                return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [node])):
            return found
    return None


def _layers(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph between the package's top-level parts (a subpackage with its modules, or a top-level module):
    a cycle here is an arrow back up, even where no single module cycle exists."""

    def part(module: str) -> str:
        return ".".join(module.split(".")[:2])

    layers: dict[str, set[str]] = {}
    for name, targets in graph.items():
        layers.setdefault(part(name), set()).update(part(t) for t in targets if part(t) != part(name))
    return layers


def _entry_points() -> dict[str, str]:
    """name -> ``module:attribute`` of every console script and entry point in pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    points = dict(project.get("scripts", {}))
    for group in project.get("entry-points", {}).values():
        points.update(group)
    return points


def _defines(path: Path, attribute: str) -> bool:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == attribute:
            return True
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == attribute for t in targets):
            return True
    return False


def _private_imports(roots: dict[str, Path]) -> set[tuple[str, str, str]]:
    modules = _modules(roots)
    return {
        (name, target, imported)
        for name, path in modules.items()
        for target, imported, _ in _imports(name, path, modules)
        if imported.startswith("_") and not imported.startswith("__") and target != name
    }


def _names_a_family(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "model_type") or (
        isinstance(node, ast.Name) and node.id in ("model_type", "family")
    )


def _has_string(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Constant) and isinstance(n.value, str) for n in ast.walk(node))


def _family_tests(roots: dict[str, Path]) -> set[tuple[str, int]]:
    """(module, line) of each comparison of a model type (or family name) with a string literal."""
    found = set()
    for name, path in _modules(roots).items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                if any(map(_names_a_family, sides)) and any(_has_string(s) for s in sides if not _names_a_family(s)):
                    found.add((name, node.lineno))
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("startswith", "endswith")
                and _names_a_family(node.func.value)
            ):
                found.add((name, node.lineno))
    return found


def _write(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    return {"pkg": root / "pkg"}


def test_the_package_has_no_import_cycle():
    assert _cycle(_graph(PACKAGE)) is None


def test_no_arrow_runs_back_up_between_subpackages():
    assert _cycle(_layers(_graph(PACKAGE))) is None


def test_every_module_stays_under_the_line_limit():
    long = {
        name: n for name, path in _modules(PACKAGE).items() if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines (split them by job): {long}"


def test_every_entry_point_and_cli_command_names_a_function_that_exists():
    modules = _modules({**PACKAGE, "normalign_vllm": REPO / "normalign_vllm"})
    from hf_normalign.cli import COMMANDS

    targets = {**_entry_points(), **{f"normalign {name}": command.run for name, command in COMMANDS.items()}}
    missing = {
        name: target
        for name, target in targets.items()
        if (module := target.partition(":")[0]) not in modules
        or not _defines(modules[module], target.partition(":")[2])
    }
    assert not missing


def test_every_import_of_the_package_names_one_of_its_modules():
    modules = _modules(PACKAGE)
    missing = {
        (name, target, line)
        for name, path in modules.items()
        for target, _, line in _imports(name, path, modules)
        if target not in modules
    }
    assert not missing  # a module moved without updating an importer (a lazy import fails only when it runs)


def test_no_private_name_is_imported_across_modules():
    assert not _private_imports(PACKAGE)


def test_family_knowledge_stays_on_the_specs():
    found = {(name, line) for name, line in _family_tests(PACKAGE) if not name.startswith("hf_normalign.specs")}
    assert not found, f"model_type tests outside hf_normalign/specs/: {sorted(found)}; put the difference on the spec"


def test_every_method_is_one_config_class_and_one_module():
    """patch() finds a method's module by its name: each holds the protocol of hf_normalign.methods, and the
    modules vLLM loads by path import nothing from hf-normalign."""
    from hf_normalign import methods
    from hf_normalign.config import METHOD_CONFIGS, METHODS

    assert tuple(METHOD_CONFIGS) == METHODS
    for name in METHODS:
        module = methods.load(name)
        assert callable(module.build), name
        assert hasattr(module, "at_layer") == hasattr(module, "layer_indices"), name
    modules = _modules(PACKAGE)
    for name in ("moca", "projector_norm"):
        module = f"hf_normalign.methods.{name}"
        assert not _imports(module, modules[module], modules), f"{module} must stay loadable by path"


def test_the_walk_finds_cycles_through_lazy_imports_and_package_inits(tmp_path):
    # a -> sub.b (runs sub/__init__, which imports sub.c) and sub.c imports a inside a function: a cycle.
    root = _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from .sub.b import x\n",
            "pkg/sub/__init__.py": "from .c import y\n",
            "pkg/sub/b.py": "x = 1\n",
            "pkg/sub/c.py": "def y():\n    from ..a import x\n",
        },
    )
    assert _cycle(_graph(root)) == ["pkg.a", "pkg.sub", "pkg.sub.c", "pkg.a"]
    # A package importing its own submodules (which import siblings) is no cycle.
    (root["pkg"] / "sub/c.py").write_text("from . import b\n", encoding="utf-8")
    assert _cycle(_graph(root)) is None


def test_the_walk_finds_family_tests(tmp_path):
    files = {
        "pkg/__init__.py": "",
        "pkg/a.py": "def f(cfg, family):\n    x = cfg.model_type == 'llava'\n    return family.startswith('qwen')\n",
        "pkg/b.py": "def g(cfg, other):\n    return cfg.model_type == other.model_type\n",
    }
    assert _family_tests(_write(tmp_path, files)) == {("pkg.a", 2), ("pkg.a", 3)}


def test_the_walk_finds_private_imports(tmp_path):
    files = {"pkg/__init__.py": "", "pkg/a.py": "_x = 1\ny = 2\n", "pkg/b.py": "from .a import _x, y\n"}
    root = _write(tmp_path, files)
    assert _private_imports(root) == {("pkg.b", "pkg.a", "_x")}


def test_the_walk_follows_string_imports(tmp_path):
    # a names b by string (a command table), b imports a lazily: a cycle; c loads its submodules by computed name.
    files = {
        "pkg/__init__.py": "",
        "pkg/a.py": 'RUN = "pkg.b:main"\n',
        "pkg/b.py": "def main():\n    from . import a\n",
        "pkg/c/__init__.py": 'import importlib\ndef load(n):\n    return importlib.import_module(f"{__name__}.{n}")\n',
        "pkg/c/d.py": "from .. import b\n",
    }
    graph = _graph(_write(tmp_path, files))
    assert _cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]
    assert graph["pkg.c"] == {"pkg.c.d"}


def test_the_layer_walk_finds_an_arrow_back_up(tmp_path):
    # No module cycle (x.low -> y.mid -> x.top), but the parts x and y point at each other.
    files = {
        "pkg/__init__.py": "",
        "pkg/x/__init__.py": "",
        "pkg/x/low.py": "",
        "pkg/x/top.py": "from ..y import mid\n",
        "pkg/y/__init__.py": "",
        "pkg/y/mid.py": "from ..x import low\n",
    }
    graph = _graph(_write(tmp_path, files))
    assert _cycle(graph) is None
    assert _cycle(_layers(graph)) == ["pkg.x", "pkg.y", "pkg.x"]
