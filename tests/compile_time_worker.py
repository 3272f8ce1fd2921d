"""Run by tests/test_layer_regions.py in a fresh process (no kernel compiled before it): prints
the CPU seconds (this process and its compiler subprocesses) and wall seconds that the first
training step of a tiny Llama of ``layers`` layers through compile_for_trainer (inductor, caches
off) takes beyond a steady step: the compile. The fused ops are opaque on the CPU, so they run
their PyTorch reference here (under TRITON_INTERPRET=1 the interpreted kernels' run time grew
with depth and was counted as compile: 4.5 s of 27.7 at 8 layers).
Usage: python compile_time_worker.py LAYERS on|off static|dynamic"""
import os
import sys
import time

os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
os.environ.setdefault("FASTLORA_CACHE", "off")
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)

import fastlora  # noqa: E402
from helpers import tiny_llama, token_batch, with_lora  # noqa: E402


def main(layers: int, reuse: bool, dynamic: bool) -> None:
    torch.manual_seed(0)
    model = with_lora(tiny_llama(layers=layers, hidden=16, heads=2, kv_heads=1, inter=16,
                                 vocab=32), r=2)
    model.train()
    fastlora.compile_for_trainer(model, dynamic=dynamic, compiler="inductor",
                                 reuse_layers=reuse)
    inputs = token_batch(vocab=32, use_cache=False)
    cpu, wall = [], []
    for _ in range(3):
        before, start = os.times(), time.perf_counter()
        model(**inputs).loss.backward()
        after = os.times()
        cpu.append(sum(after[:4]) - sum(before[:4]))
        wall.append(time.perf_counter() - start)
    print(f"cpu={cpu[0] - min(cpu[1:]):.2f} wall={wall[0] - min(wall[1:]):.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2] == "on", sys.argv[3] == "dynamic")
