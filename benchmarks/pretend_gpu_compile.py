"""A cold compile of the inductor launch route on a machine without a GPU, by phase: the
tiny Llama of the tests through ``compile_for_trainer`` (dynamic lengths, shared layer bodies),
with tests/pretend_gpu.py standing in for the GPU and inductor's code generation replaced by a
capture (nothing is launched), so Dynamo's trace, AOTAutograd's metadata pass and joint trace
(where fastlora's op bodies are traced into their kernel launches), and the partitioner are
timed as on a GPU host.

    python benchmarks/pretend_gpu_compile.py --layers 16 [--profile]

Prints Dynamo's ``compile_times()`` (every entry, so repeated traces of a shared body show),
how many kernel launches were traced and what their access analyses cost, and the backward
variants of the shared body; with ``--profile`` the cumulative time of fastlora's functions
(cProfile; the totals grow by about a half under it). Writes nothing.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pathlib
import pstats
import sys
import time

TESTS = pathlib.Path(__file__).resolve().parent.parent / "tests"
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != TESTS.parent / "benchmarks"]
sys.path.insert(0, str(TESTS))  # pretend_gpu, helpers


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--bf16", action="store_true",
                        help="the model in bfloat16, the LoRA weights in float32 (the GPU rows)")
    parser.add_argument("--padded", action="store_true",
                        help="a right-padded batch with an attention mask, labels -100 on pads")
    args = parser.parse_args()
    from pretend_gpu import (capture_instead_of_codegen, count_backward_variants, pretend_gpu,
                             step_until_captured)
    pretend_gpu()
    import torch
    from torch._dynamo.utils import compile_times

    import fastlora
    from fastlora.kernels import _access_cache
    from helpers import tiny_llama, with_lora

    capture_instead_of_codegen()
    variants = count_backward_variants()

    torch.manual_seed(0)
    model = with_lora(tiny_llama(layers=args.layers, hidden=64, inter=128))
    if args.bf16:
        model.to(torch.bfloat16)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()
    compiled = fastlora.compile_for_trainer(model, dynamic=True, compiler="inductor",
                                            reuse_layers=True)
    ids = torch.randint(0, 97, (2, 48))
    batch = {"input_ids": ids, "labels": ids}
    if args.padded:
        mask = torch.ones_like(ids)
        mask[1, 30:] = 0
        batch = {"input_ids": ids, "attention_mask": mask,
                 "labels": ids.masked_fill(mask == 0, -100)}
    profile = cProfile.Profile() if args.profile else None
    start = time.perf_counter()
    if profile:
        profile.enable()
    step_until_captured(lambda: compiled(**batch).loss.backward())
    if profile:
        profile.disable()
    print(f"first step up to inductor's codegen: {time.perf_counter() - start:.1f} s, "
          f"{args.layers} layers")
    print(f"kernel access analyses: {_access_cache.stats}")
    print(f"backward variants of shared bodies: {variants or 'none (no shared body)'}")
    print(compile_times(repr="str", aggregate=False))
    if profile:
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats("fastlora", 25)
        print(out.getvalue())


if __name__ == "__main__":
    main()
