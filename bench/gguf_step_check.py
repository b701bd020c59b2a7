"""Where a step and a verification tree of the default target spend their time, dense fp32 against the GGUF
block weights, on this CPU: median ms of a forward of T tokens after a 200-token context (logits included), the
block kernel's arithmetic rate at 1 and 8 rows, and the machine's streaming read rate. Prints one JSON line.

    python bench/gguf_step_check.py >> bench/results/DATE-CPU-gguf-steps/gguf-steps.jsonl
"""
import json
import time

import torch

from gsd_serve.models import ModelRunner, load_default_pair
from gsd_serve.models.hardware import cpu_description
from gsd_serve.models.gguf_blocks import use_gguf_blocks
from gsd_serve.models.gguf_kernels import block_matmul


def forward_ms(runner, sizes=(1, 4, 8, 16, 32), repeats=15) -> dict:
    out = {}
    with torch.inference_mode():
        cache = runner.new_cache()
        runner.hidden(cache, torch.arange(100, 300))
        for t in sizes:
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                runner.logits(runner.hidden(cache, torch.arange(400, 400 + t)))
                times.append(time.perf_counter() - t0)
                cache.truncate(200)
            out[t] = round(sorted(times)[len(times) // 2] * 1e3, 2)
    return out


def kernel_gflops(rows: int, out_features: int = 3072, in_features: int = 576) -> float:
    blocks = torch.randint(0, 256, (out_features, in_features // 32 * 20), dtype=torch.uint8)
    blocks[:, : in_features // 32 * 4] = torch.tensor([0, 0x20], dtype=torch.uint8).repeat(in_features // 32 * 2)
    x = torch.randn(rows, in_features)
    for _ in range(10):
        block_matmul("q4_1", x, blocks, out_features)
    t0 = time.perf_counter()
    for _ in range(100):
        block_matmul("q4_1", x, blocks, out_features)
    dt = (time.perf_counter() - t0) / 100
    return round(2 * rows * out_features * in_features / dt / 1e9, 1)


def read_gb_s() -> float:
    a = torch.ones(128 * 1024 * 1024 // 4 * 4)     # 512 MB
    a.sum()
    t0 = time.perf_counter()
    for _ in range(3):
        a.sum()
    return round(3 * a.numel() * 4 / (time.perf_counter() - t0) / 1e9, 1)


def main() -> None:
    target, _, _ = load_default_pair(torch.float32)
    dense = forward_ms(ModelRunner(target), sizes=(1, 16), repeats=7)
    use_gguf_blocks(target)
    gguf = forward_ms(ModelRunner(target))
    print(json.dumps({"cpu": cpu_description(), "threads": torch.get_num_threads(),
                      "dense_fp32_forward_ms": dense, "gguf_forward_ms": gguf,
                      "q4_1_kernel_gflops": {1: kernel_gflops(1), 8: kernel_gflops(8)},
                      "memory_read_gb_s": read_gb_s()}))


if __name__ == "__main__":
    main()
