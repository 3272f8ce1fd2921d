"""A script (tests/test_shared_body_backward.py starts it in a process of its own): how many
times the backward of a decoder layer body shared by ``reuse_layers`` is traced, for a tiny
Llama compiled by ``compile_for_trainer`` on the inductor launch route (tests/pretend_gpu.py:
no GPU, nothing launched; inductor's own compile of the graphs is replaced by a capture).

    python tests/shared_body_backward.py --layers 4

torch.compile traces a shared body's backward once per distinct metadata of the gradients the
body receives (shapes, strides, storage size, aliasing). Every layer's output gradient should
look alike; one variant more is one more trace of the layer's backward in a cold compile.
Prints one JSON line: {"backward_variants": n, "graphs": [...]}.
"""
from __future__ import annotations

import argparse
import json

import torch

from pretend_gpu import (capture_instead_of_codegen, count_backward_variants, pretend_gpu,
                         step_until_captured)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    pretend_gpu()
    import fastlora
    from helpers import tiny_llama, with_lora

    graphs = capture_instead_of_codegen()
    variants = count_backward_variants()
    torch.manual_seed(0)
    model = with_lora(tiny_llama(layers=args.layers, hidden=64, inter=128))
    compiled = fastlora.compile_for_trainer(model, dynamic=True, compiler="inductor",
                                            reuse_layers=True)
    ids = torch.randint(0, 97, (2, 24))
    step_until_captured(lambda: compiled(input_ids=ids, labels=ids).loss.backward())
    print(json.dumps({"backward_variants": max(variants.values(), default=0),
                      "graphs": [type(gm).__name__ for gm in graphs]}))


if __name__ == "__main__":
    main()
