"""The package's import structure: no import circles inside `service/`, and serving needs no training/bench extra.

What counts as an import edge (module A -> module B, both under `service/`):
  - every `import service.x` / `from service.x import y` / `from service import x` / relative import in A, at module
    level *and* inside functions or methods (a lazy import is still a dependency; hiding a circle in a function body
    only moves the failure to run time);
  - `from pkg import name` counts as importing `pkg` and, when `pkg/name.py` exists, the submodule `pkg.name`;
  - imports under `if TYPE_CHECKING:` count too: they never run, but a circle in the types is still a circle in the
    design (neither module can be read, typed or moved without the other).
Package `__init__` modules are nodes like any other (ours import nothing, so the parent packages that Python runs
before a submodule add no edges and are left out).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = REPO_ROOT / "service"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported_names(tree: ast.Module, module: str, is_package: bool) -> list[str]:
    """Every module name an import statement anywhere in `tree` asks for, absolute."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                package_parts = module.split(".") if is_package else module.split(".")[:-1]
                base_parts = package_parts[: len(package_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.append(base)
            found.extend(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the `service` modules it imports (see the module docstring for what counts)."""
    files = {_module_name(path): path for path in PACKAGE_DIR.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        targets: set[str] = set()
        for name in _imported_names(tree, module, path.name == "__init__.py"):
            # `from pkg import name`: `pkg.name` when it is a module, else `pkg` (added as its own entry above).
            if name in files and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a closed path through it."""
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0

    def strongconnect(node: str) -> None:
        nonlocal counter
        index[node] = lowlink[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                strongconnect(target)
                lowlink[node] = min(lowlink[node], lowlink[target])
            elif target in on_stack:
                lowlink[node] = min(lowlink[node], index[target])
        if lowlink[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            strongconnect(node)
    return [_cycle_path(graph, component) for component in components]


def _cycle_path(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One concrete circle inside a strongly connected component (shortest back to its first module), for the message."""
    members = set(component)
    start = component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        next_frontier = []
        for node in frontier:
            for target in sorted(graph[node] & members):
                if target == start:
                    return paths[node] + [start]
                if target not in paths:
                    paths[target] = paths[node] + [target]
                    next_frontier.append(target)
        frontier = next_frontier
    return component  # unreachable for a true component


def test_the_graph_sees_lazy_relative_and_from_imports() -> None:
    # The walker itself: a cycle-free verdict is worth nothing if imports are missed.
    graph = import_graph()
    assert "service.engine" in graph["service.api.state"]  # module level
    assert "service.api.app" in graph["service.cli"]  # inside a function (_serve)
    assert "service.bench.cli" in graph["service.cli"]
    snippet = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from service.runner import ModelRunner\n"
        "def f():\n    from . import rows\n    from ..errors import ServiceError\n"
    )
    names = _imported_names(snippet, "service.api.auth", is_package=False)
    assert {"service.runner", "service.api.rows", "service.errors"} <= set(names)
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_service() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import circles in service/:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


# ---------------------------------------------------------------------------------------------------------------------
# Serving installs neither the `train` nor the `bench` extra (pyproject.toml): the server's modules need neither.

EXTRA_ONLY = ("peft", "tqdm", "matplotlib")  # what the two extras add that serving must not import itself
# tqdm stays installed with the server (transformers and huggingface-hub import it themselves), so the import test
# below can only block peft and matplotlib; the AST test covers all three in our own code.
BLOCKED_AT_RUN_TIME = ("peft", "matplotlib")
SERVING_ENTRY_POINTS = (
    "service.api.app", "service.engine", "service.registry", "service.cli", "service.model_loader",
    "service.scaleout.replica", "service.scaleout.ingress",
)


def _serving_module(module: str) -> bool:
    return not module.startswith(("service.training", "service.bench"))


def test_serving_code_never_imports_an_extra() -> None:
    # Lazy imports included: a function of the server that imported peft would fail only when called.
    offenders = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        module = _module_name(path)
        if not _serving_module(module) or module == "service.extras":
            continue
        names = _imported_names(ast.parse(path.read_text()), module, path.name == "__init__.py")
        used = sorted({name.split(".")[0] for name in names} & set(EXTRA_ONLY))
        if used:
            offenders[module] = used
    assert not offenders, f"serving modules importing the train/bench extras: {offenders}"


_BLOCKER = """
import importlib.abc, sys

class BlockExtras(importlib.abc.MetaPathFinder):
    # As if the package were not installed: the same exception, with the same `name`, as a real absence.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, BlockExtras())
"""


def _run_without_extras(code: str) -> subprocess.CompletedProcess[str]:
    script = _BLOCKER.format(blocked=set(BLOCKED_AT_RUN_TIME)) + textwrap.dedent(code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, cwd=REPO_ROOT
    )


def test_the_blocker_blocks() -> None:
    # Guards the tests below: if the finder stopped working, "imports fine without peft" would prove nothing.
    result = _run_without_extras("import peft")
    assert result.returncode != 0 and "blocked by the test" in result.stderr


def test_serving_modules_import_without_the_train_and_bench_extras() -> None:
    result = _run_without_extras(
        f"""
        import importlib
        for name in {SERVING_ENTRY_POINTS!r}:
            importlib.import_module(name)
        from service.cli import build_parser
        build_parser()  # the parser of every command, train and bench included
        leaked = sorted(name for name in sys.modules if name.split(".")[0] in {BLOCKED_AT_RUN_TIME!r})
        assert not leaked, leaked
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize(
    "argv, extra",
    [
        (["train", "--data", "train.jsonl", "--task-id", "t", "--out", "adapter"], "train"),
        (["examples", "train", "--tasks", "sentiment"], "train"),
        (["bench", "--out", "bench-out"], "bench"),
    ],
)
def test_a_command_without_its_extra_says_which_extra_to_install(argv: list[str], extra: str, tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "completion": " b"}\n')
    result = _run_without_extras(
        f"""
        import os
        os.chdir({str(tmp_path)!r})
        from service.cli import main
        sys.exit(main({argv!r}))
        """
    )
    assert result.returncode == 2, result.stderr
    assert f"needs the '{extra}' extra" in result.stderr and f"pip install 'prefix-serve[{extra}]'" in result.stderr
    assert "Traceback" not in result.stderr
