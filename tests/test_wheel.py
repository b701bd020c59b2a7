"""`pip wheel .` gives a wheel that works installed: generate, serve --dry-run and the gRPC stubs, run from
outside the repository, in a fresh virtual environment that has the wheel and its dependencies only.

The dependencies come from this environment's site-packages through a .pth file (the fresh environment
would otherwise download torch, Ray and the rest again); the project itself comes only from the wheel.
"""
from __future__ import annotations

import os
import site
import subprocess
import sys
import venv
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"), ROOT],
                   check=True, capture_output=True, text=True, timeout=600)
    wheels = list((tmp / "dist").glob("gsd_serve-*.whl"))
    assert len(wheels) == 1, wheels
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # this environment's dependencies, but not its editable gsd_serve (its finder lives in a .pth that a
    # .pth-added folder does not run)
    with open(os.path.join(purelib, "deps_from_test_env.pth"), "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "-q", str(wheels[0])], check=True,
                   capture_output=True, text=True, timeout=300)
    return {"wheel": wheels[0], "python": py, "bin": env_dir / "bin", "cwd": tmp}


def _run(installed, *args, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    return subprocess.run(list(args), cwd=installed["cwd"], env=env, capture_output=True, text=True, timeout=timeout)


def test_the_wheel_holds_the_package_and_no_top_level_services(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"gsd_serve"}, tops
    for needed in ("gsd_serve/services/app.py", "gsd_serve/services/draft.py", "gsd_serve/tools/bench_serve.py",
                   "gsd_serve/training/distill.py", "gsd_serve/models/kernels/gguf_matmul.c",
                   "gsd_serve/serving/_generated/gsd/v1/gsd_pb2_grpc.py", "gsd_serve/data/draft/model.safetensors",
                   "gsd_serve/data/feature_draft/model.safetensors",
                   "gsd_serve/data/bench_prompts.jsonl"):
        assert needed in names, needed


def test_installed_package_imports_stubs_and_services_from_the_wheel(installed):
    r = _run(installed, str(installed["python"]), "-c",
             "import gsd_serve, gsd_serve.services.app as app, gsd_serve.serving.rpc as rpc; "
             "print(gsd_serve.__file__); print(app.__file__); print(rpc.pb.GenerateRequest.DESCRIPTOR.full_name)\n"
             "try:\n    import services\nexcept ImportError:\n    print('no top-level services')")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split()
    venv_root = str(installed["bin"].parent)
    assert lines[0].startswith(venv_root) and lines[1].startswith(venv_root), lines
    assert "gsd.v1.GenerateRequest" in lines and "no top-level services" in r.stdout


def test_installed_generate_and_serve_dry_run(installed):
    cli = str(installed["bin"] / "gsd-serve")
    r = _run(installed, cli, "generate", "--method", "gsd", "--prompt", "Name three colors.", "--max-new-tokens", "8",
             "--json")
    assert r.returncode == 0, r.stderr
    assert '"token_ids"' in r.stdout
    r = _run(installed, cli, "serve", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "gRPC gsd.v1.Router" in r.stdout
