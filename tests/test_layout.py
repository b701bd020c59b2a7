"""The house keeps its layers and has no import loops, read from the code's own imports (ast, nothing
imported); and the committed gRPC stubs match the proto.

Layers, each importing only the layers it names in MAY_IMPORT (its package docstring says the same):

    core -> models -> training                          (training and serving never import each other)
                   -> serving (with services) -> tools
    cli imports them all; nothing imports cli.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gsd_serve"


def _modules(package: Path = PACKAGE):
    """(dotted module name, path) of every source module of the package (the generated stubs aside)."""
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).with_suffix("")
        if "_generated" in rel.parts:
            continue
        yield ".".join(p for p in rel.parts if p != "__init__") if rel.name == "__init__" else ".".join(rel.parts), path


def _import_statements(module: str, path: Path):
    """(imported name, names taken from it or None) of every import in `path`, anywhere in it (function-level
    imports count), with absolute names: `from .x import y` gives ("pkg.x", ["y"]), `import a.b` ("a.b", None)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            yield name, [a.name for a in node.names]


def _imports(module: str, path: Path) -> set[str]:
    """Every name `path` imports, absolute: modules, and `from` imports' names under their module
    (`from . import rpc` names the module pkg.rpc)."""
    found = set()
    for name, names in _import_statements(module, path):
        found.add(name)
        found.update(f"{name}.{n}" for n in names or ())
    return found


LAYERS = {"core": "core", "models": "models", "training": "training", "serving": "serving",
          "services": "serving", "tools": "tools", "cli": "cli"}
MAY_IMPORT = {
    "core": {"core"},
    "models": {"core", "models"},
    "training": {"core", "models", "training"},
    "serving": {"core", "models", "serving"},
    "tools": {"core", "models", "serving", "tools"},
    "cli": {"core", "models", "training", "serving", "tools", "cli"},
}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "gsd_serve":
        return None
    return LAYERS.get(parts[1])


def _upward_imports(modules) -> list[str]:
    bad = []
    for module, path in modules:
        mine = _layer(module)
        if mine is None:
            continue
        for name in _imports(module, path):
            theirs = _layer(name)
            if theirs is not None and theirs not in MAY_IMPORT[mine]:
                bad.append(f"{module} ({mine}) imports {name} ({theirs})")
    return bad


def test_no_layer_imports_a_layer_it_may_not():
    bad = _upward_imports(_modules())
    assert not bad, "\n".join(bad)


def test_every_package_belongs_to_a_layer():
    tops = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert tops <= set(LAYERS), f"packages without a layer: {sorted(tops - set(LAYERS))}"


def test_the_check_catches_an_upward_import(tmp_path):
    # relative and function-level imports count too
    f = tmp_path / "bad.py"
    f.write_text("def f():\n    from ..serving import router\n")
    assert sorted(_upward_imports([("gsd_serve.core.bad", f)])) == [
        "gsd_serve.core.bad (core) imports gsd_serve.serving (serving)",
        "gsd_serve.core.bad (core) imports gsd_serve.serving.router (serving)"]
    assert _upward_imports([("gsd_serve.cli.ok", f)]) == []
    # siblings: training and serving never import each other
    f.write_text("from ..serving import rpc\n")
    assert sorted(_upward_imports([("gsd_serve.training.bad", f)])) == [
        "gsd_serve.training.bad (training) imports gsd_serve.serving (serving)",
        "gsd_serve.training.bad (training) imports gsd_serve.serving.rpc (serving)"]


# ---------------------------------------------------------------- import loops

def _import_graph(modules) -> dict[str, set[str]]:
    """module -> the package's modules it imports (function-level imports count). `from pkg import name`
    imports the module pkg.name where there is one, else pkg (its __init__); the parent packages Python runs
    before a module are not edges unless the code names them."""
    modules = dict(modules)
    graph = {}
    for module, path in modules.items():
        edges = set()
        for name, names in _import_statements(module, path):
            for n in names or [None]:
                target = f"{name}.{n}" if n is not None and f"{name}.{n}" in modules else name
                if target in modules and target != module:
                    edges.add(target)
        graph[module] = edges
    return graph


def _loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_no_import_loops():
    loops = _loops(_import_graph(_modules()))
    assert not loops, "import loops:\n" + "\n".join(" <-> ".join(c) for c in loops)


def test_the_check_catches_an_import_loop(tmp_path):
    pkg = tmp_path / "gsd_serve" / "models"
    (pkg / "inner").mkdir(parents=True)
    for f in (pkg.parent / "__init__.py", pkg / "__init__.py", pkg / "inner" / "__init__.py"):
        f.write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def x():\n    from .inner import c\n")          # function-level
    (pkg / "inner" / "c.py").write_text("from ..a import y\n")                  # relative, two levels
    (pkg / "d.py").write_text("from . import a\n")                              # outside the loop
    graph = _import_graph(_modules(tmp_path / "gsd_serve"))
    assert graph["gsd_serve.models.d"] == {"gsd_serve.models.a"}
    assert _loops(graph) == [["gsd_serve.models.a", "gsd_serve.models.b", "gsd_serve.models.inner.c"]]
    (pkg / "inner" / "c.py").write_text("import os\n")
    assert _loops(_import_graph(_modules(tmp_path / "gsd_serve"))) == []


def test_core_is_free_of_serving_machinery_and_models_import_ray_in_one_place():
    heavy = ("ray", "grpc", "redis", "fastapi", "gsd_serve.services")
    bad = []
    for module, path in _modules():
        layer = _layer(module)
        for name in _imports(module, path):
            top = name.split(".")[0]
            if layer == "core" and (top in heavy or name.startswith(heavy)):
                bad.append(f"{module} imports {name}")
            if layer == "models" and top == "ray" and not module.endswith("tensor_parallel.ray_actors"):
                bad.append(f"{module} imports {name} (Ray belongs in tensor_parallel.ray_actors)")
    assert not bad, "\n".join(bad)


def test_only_the_tools_need_the_bench_extra():
    """matplotlib, aiohttp and httpx come with `pip install gsd-serve[bench]`: only gsd_serve.tools imports them
    (the commands in cli/ import tools on use), so the library and the server run without them."""
    extra = {"matplotlib", "aiohttp", "httpx"}
    bad = [f"{module} imports {name}" for module, path in _modules() if _layer(module) != "tools"
           for name in _imports(module, path) if name.split(".")[0] in extra]
    assert not bad, "\n".join(bad)


def test_every_layer_says_what_it_may_import():
    for package in LAYERS:
        doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text()))
        assert doc and "import" in doc, f"gsd_serve/{package}/__init__.py needs a docstring with its import rule"


def test_committed_grpc_stubs_match_the_proto(tmp_path):
    """The stubs under gsd_serve/serving/_generated are generated from protos/gsd/v1/gsd.proto, never edited:
    regenerating them gives the same descriptor and the same service code."""
    pytest.importorskip("grpc_tools")
    import re

    from gsd_serve.serving import protogen, rpc

    out = protogen.generate(out_root=tmp_path)
    fresh_src = (out / "gsd_pb2.py").read_text()
    # the serialized FileDescriptorProto: what the messages and services are, independent of protoc's version
    fresh_desc = re.search(r"AddSerializedFile\((b'.*?')\)", fresh_src, re.S).group(1)
    committed_src = Path(rpc.pb.__file__).read_text()
    committed_desc = re.search(r"AddSerializedFile\((b'.*?')\)", committed_src, re.S).group(1)
    assert fresh_desc == committed_desc, "the proto changed: run `python -m gsd_serve.serving.protogen` and commit"

    def service_code(p: Path) -> str:
        return re.sub(r"GRPC_GENERATED_VERSION = .*", "", p.read_text())

    assert service_code(out / "gsd_pb2_grpc.py") == service_code(Path(rpc.pb_grpc.__file__))
