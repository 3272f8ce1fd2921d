"""Profile LoRA training steps of one shape through one variant on the GPU (torch.profiler).

    python benchmarks/profile_step.py --shape llama-1b --variant fastlora

Prints the top GPU kernels by total time, the GPU busy time per step against the wall time per
step (a large gap means the step is bound by CPU-side overhead), and writes a Chrome trace.
"""
import argparse
import os
import pathlib
import time

import torch

import _harness as h  # this folder is first on sys.path when a script of it runs

h.unshadow()
train_step = h.sibling("train_step")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="llama-1b")
    ap.add_argument("--variant", default="fastlora")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    a = ap.parse_args()
    args = argparse.Namespace(shape=a.shape, variant=a.variant, rank=16, load_4bit=False,
                              gc=train_step.SHAPES[a.shape][2], cache="/tmp/fastlora-bench")
    if a.variant == "fastlora":
        import fastlora  # noqa: F401
    cfg = train_step.build_config(a.shape)
    model = train_step.build_model(args, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], fused=True)
    run = torch.compile(model, backend=a.variant) if a.variant in ("fastlora", "inductor") \
        else model
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), device="cuda")

    def step():
        run(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in range(a.steps):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / a.steps
    events = prof.key_averages()
    gpu = h.kernel_ms(prof, a.steps)  # kernels only: an op's device time repeats its kernels'
    print(f"wall {1e3 * wall:.1f} ms/step, GPU kernels {gpu:.1f} ms/step")
    print(events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70))
    out = pathlib.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out / f"trace_{a.shape}_{a.variant}.json"))


if __name__ == "__main__":
    main()
