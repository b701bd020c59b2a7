"""Why replicas do all model work on one thread, and why OMP_WAIT_POLICY stays unset: the same bf16 decoding
step of the default target timed on the thread that loaded the model and on another thread (OpenMP keeps one
team of threads per calling thread), then a whole generation in each. Prints one JSON line.

    python bench/model_thread_check.py            # run it with and without OMP_WAIT_POLICY=PASSIVE
"""
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from gsd_serve.models import ModelRunner, load_default_pair
from gsd_serve.models.hardware import cpu_description


def step_ms(runner) -> float:
    with torch.inference_mode():
        cache = runner.new_cache()
        runner.hidden(cache, torch.arange(100, 300))
        x = torch.tensor([100])
        for _ in range(5):
            runner.logits(runner.hidden(cache, x))
        t0 = time.perf_counter()
        for _ in range(30):
            runner.logits(runner.hidden(cache, x))
        return round((time.perf_counter() - t0) / 30 * 1000, 2)


def main() -> None:
    target, _, _ = load_default_pair(torch.bfloat16)
    runner = ModelRunner(target)
    loading_thread = step_ms(runner)
    with ThreadPoolExecutor(1) as ex:
        other_thread = ex.submit(step_ms, runner).result()
    print(json.dumps({"cpu": cpu_description(), "threads": torch.get_num_threads(),
                      "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "unset"),
                      "bf16_step_ms_loading_thread": loading_thread, "bf16_step_ms_other_thread": other_thread}))


if __name__ == "__main__":
    main()
