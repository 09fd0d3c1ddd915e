"""Code fingerprints: which of the project's code a stage's output depends on, as a short hash.

A stage is keyed on the modules it actually runs, not on the whole package: its *import closure* inside the
project (`sdrpn_core`, `stages`, `storage`), found by reading the import statements of each module's source
(imports inside functions included, `if TYPE_CHECKING:` blocks not). A package that imports its own modules
dynamically (a registry's `pkgutil.iter_modules(__path__)`) depends on all of them. Each module is hashed as its
syntax tree without docstrings, so comments, docstrings and formatting never re-run a stage.

Some code reaches a stage's output only through values that the stage's key already holds: a benchmark's prompt
enters an evaluation piece as the prompt strings it produces, its metric enters only the scoring. A stage names
such modules in `exclude` (never followed), and a test checks that the values stand in for them. Where finer
grain pays, `function_fingerprint` hashes one function with the project functions, classes and constants it
refers to, transitively (a benchmark's metric, not every metric).

The versions of the libraries that change a model's numbers (`library_versions`) key the stages that run it.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import inspect
import threading
import types
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path
from typing import Any

from storage.fingerprint import FP_LEN, hash_obj

PROJECT = ("sdrpn_core", "stages", "storage")  # the packages whose code is fingerprinted
NUMERIC_LIBRARIES = ("torch", "transformers")  # their versions change what a model computes
# the benchmarks' readers, prompts and metrics: a stage that excludes them holds their part in its key by value
BENCHMARK_CODE = ("sdrpn_core.benchmarks", "sdrpn_core.metrics")
# CPython 3.11's AST constructor keeps its recursion depth in process-wide state: two threads parsing at once fail
# with "AST constructor recursion depth mismatch" (mapped teacher shards key themselves concurrently)
_PARSING = threading.RLock()


def is_project(module: str) -> bool:
    return module.split(".")[0] in PROJECT


@cache
def _spec(module: str) -> tuple[Path, bool] | None:
    """(source file, is a package) of a project module, or None when there is no such module."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin), spec.submodule_search_locations is not None


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return tree


def normalized(source: str) -> str:
    """The code without comments, docstrings or formatting: what running it depends on."""
    with _PARSING:
        return ast.unparse(_strip_docstrings(ast.parse(source)))


@cache
def _module_hash(module: str) -> str:
    path, _ = _spec(module)  # type: ignore[misc]
    return hashlib.sha256(normalized(path.read_text()).encode()).hexdigest()


def _type_checking_only(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    stack = [tree]
    while stack:
        node = stack.pop()
        if _type_checking_only(node):
            stack.extend(node.orelse)  # type: ignore[attr-defined]
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _with_parents(module: str) -> list[str]:
    """Importing a.b.c runs a/__init__ and a/b/__init__ too."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


@cache
def direct_imports(module: str) -> frozenset[str]:
    """The project modules `module`'s source imports (anywhere in the file but under TYPE_CHECKING)."""
    found = _spec(module)
    if found is None:
        return frozenset()
    path, is_package = found
    with _PARSING:
        tree = ast.parse(path.read_text())
        unparsed = ast.unparse(tree)
    names: set[str] = set()
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
            continue
        source = _absolute(node, module, is_package)
        names.add(source)
        names.update(f"{source}.{alias.name}" for alias in node.names if _spec(f"{source}.{alias.name}"))
    if is_package and "iter_modules" in unparsed:  # a registry importing every module of its package
        names.update(f"{module}.{p.stem}" for p in path.parent.glob("*.py") if p.stem != "__init__")
    return frozenset(m for name in names if is_project(name) for m in _with_parents(name) if _spec(m))


def _excluded(module: str, exclude: tuple[str, ...]) -> bool:
    return any(module == e or module.startswith(e + ".") for e in exclude)


@cache
def import_closure(roots: tuple[str, ...], exclude: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Every project module the `roots` import, transitively, without following the `exclude` packages (a root
    inside an excluded package is still taken, with what it imports)."""
    seen: set[str] = set()
    stack = [m for root in roots for m in _with_parents(root) if is_project(m)]
    while stack:
        module = stack.pop()
        if module in seen or (_excluded(module, exclude) and module not in roots):
            continue
        if _spec(module) is None:
            raise ModuleNotFoundError(f"code fingerprint: no module {module!r} (named by a stage's code roots)")
        seen.add(module)
        stack.extend(direct_imports(module) - seen)
    return tuple(sorted(seen))


def code_fingerprint(roots: Iterable[str], exclude: Iterable[str] = ()) -> str:
    """The normalized sources of the `roots`' import closure, as a short hash."""
    with _PARSING:
        closure = import_closure(tuple(sorted(set(roots))), tuple(sorted(set(exclude))))
        return hash_obj({m: _module_hash(m) for m in closure})


# -- one function, with what it refers to -------------------------------------------------------------------------


def _referenced(fn: Callable[..., Any]) -> Iterable[Any]:
    """The objects the function's code names: globals, closure cells, and attributes of project modules."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return
    env = {**getattr(fn, "__globals__", {}), **_cells(fn)}
    consts = [c for c in code.co_consts if isinstance(c, types.CodeType)]
    names = set(code.co_names) | set(code.co_freevars)
    for inner in consts:  # lambdas and comprehensions inside the function
        names |= set(inner.co_names) | set(inner.co_freevars)
    for name in sorted(names):
        if name in env:
            value = env[name]
            yield value
            if isinstance(value, types.ModuleType) and is_project(value.__name__):
                yield from (getattr(value, attr) for attr in sorted(names) if hasattr(value, attr))


def _cells(fn: Callable[..., Any]) -> dict[str, Any]:
    cells = getattr(fn, "__closure__", None) or ()
    out = {}
    for name, cell in zip(fn.__code__.co_freevars, cells, strict=False):
        try:
            out[name] = cell.cell_contents
        except ValueError:  # an empty cell
            continue
    return out


def _object_source(obj: Any, root: bool = False) -> str | None:
    module = getattr(obj, "__module__", None) or ""
    if not (root or is_project(module)) or not (inspect.isfunction(obj) or inspect.isclass(obj)):
        return None
    try:
        source = inspect.getsource(obj)
    except (OSError, TypeError):
        return None
    try:
        return normalized(inspect.cleandoc("\n" + source) if source.startswith((" ", "\t")) else source)
    except SyntaxError:  # a lambda's line, cut from a larger expression
        return source.strip()


@cache
def function_fingerprint(fn: Callable[..., Any]) -> str:
    """`fn`'s normalized source (wherever it is defined) with every project function, class and simple constant it
    refers to, transitively (a lambda's defining line stands for the lambda). Library objects are not followed.
    Once per function and process, as the modules' hashes: the code a process runs does not change under it."""
    with _PARSING:
        return _function_fingerprint(fn)


def _function_fingerprint(fn: Callable[..., Any]) -> str:
    parts: dict[str, str] = {}
    stack: list[Any] = [fn]
    seen: set[int] = set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        source = _object_source(obj, root=obj is fn)
        if source is None:
            continue
        parts[f"{obj.__module__}.{obj.__qualname__}:{len(parts)}"] = source
        for ref in _referenced(obj):
            if isinstance(ref, (str, int, float, bool, tuple, frozenset)) and not isinstance(ref, type):
                parts[f"const:{len(parts)}"] = repr(ref)[:10_000]
            else:
                stack.append(ref)
    return hashlib.sha256(repr(sorted(parts.values())).encode()).hexdigest()[:FP_LEN]


@cache
def library_versions() -> dict[str, str]:
    """The installed versions of the libraries whose numerics a model-running stage's output depends on."""
    versions = {}
    for name in NUMERIC_LIBRARIES:
        module = importlib.import_module(name)
        versions[name] = str(getattr(module, "__version__", "unknown"))
    return versions
