"""The house keeps its layers, read from the code's own imports (ast, nothing imported), and the committed
gRPC stubs match the proto.

Layers, each importing only those before it: core -> models -> serving (with services/) -> cli.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gsd_serve"


def _modules():
    """(dotted module name, path) of every source module of the installed package, services/ included."""
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        if "_generated" in rel.parts:
            continue
        yield ".".join(p for p in rel.parts if p != "__init__") if rel.name == "__init__" else ".".join(rel.parts), path
    for path in sorted((ROOT / "services").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = ("gsd_serve",) + rel.parts
        yield ".".join(p for p in parts if p != "__init__"), path


def _imports(module: str, path: Path) -> set[str]:
    """Every module `path` imports, anywhere in it (function-level imports count), absolute names."""
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            found.add(name)
            found.update(f"{name}.{a.name}" for a in node.names)   # `from . import rpc` names a module
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "gsd_serve":
        return None
    return {"core": "core", "models": "models", "serving": "serving", "services": "serving",
            "cli": "cli"}.get(parts[1])


ORDER = ["core", "models", "serving", "cli"]


def _upward_imports(modules) -> list[str]:
    bad = []
    for module, path in modules:
        mine = _layer(module)
        if mine is None:
            continue
        for name in _imports(module, path):
            theirs = _layer(name)
            if theirs is not None and ORDER.index(theirs) > ORDER.index(mine):
                bad.append(f"{module} ({mine}) imports {name} ({theirs})")
    return bad


def test_no_layer_imports_a_layer_above_it():
    bad = _upward_imports(_modules())
    assert not bad, "\n".join(bad)


def test_the_check_catches_an_upward_import(tmp_path):
    # relative and function-level imports count too
    f = tmp_path / "bad.py"
    f.write_text("def f():\n    from ..serving import router\n")
    assert sorted(_upward_imports([("gsd_serve.core.bad", f)])) == [
        "gsd_serve.core.bad (core) imports gsd_serve.serving (serving)",
        "gsd_serve.core.bad (core) imports gsd_serve.serving.router (serving)"]
    assert _upward_imports([("gsd_serve.cli.ok", f)]) == []


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


def test_every_layer_says_what_it_may_import():
    for layer in ("core", "models", "serving", "cli"):
        doc = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text()))
        assert doc and "import" in doc, f"gsd_serve/{layer}/__init__.py needs a docstring with its import rule"


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
