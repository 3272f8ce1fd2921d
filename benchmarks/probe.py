"""What the GPU machine has, in a few seconds: the versions of what fastlora runs on, and the
facts about this torch and transformers that decide how a compile goes.

    benchmarks/run_gpu.sh probe          # prints one JSON object

- ``dynamo_reuses_layer_traces``: whether this torch's Dynamo can reuse a traced
  ``nested_compile_region`` body instead of tracing every decoder layer again (torch 2.13 has
  it; whether 2.11 does decides what a compile of the layers costs there);
- ``attention_wrapped_by_kernels``: whether transformers' attention carries the ``kernels``
  package's wrapper, whose side effect stops that reuse (docs/options.md, ``reuse_layers``);
- the GPU's name and memory, the CUDA version, the number of CPUs (the host's share of a step).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os

import _harness as h  # this folder is first on sys.path when a script of it runs

h.unshadow()  # (its kernels.py would shadow the `kernels` package)


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def probe() -> dict:
    import torch
    facts = {name: _version(name) for name in
             ("torch", "triton", "transformers", "peft", "trl", "bitsandbytes", "kernels")}
    facts["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts["gpu"] = props.name
        facts["gpu_gib"] = round(props.total_memory / 2**30, 1)
    facts["cpus"] = os.cpu_count()
    reuse = importlib.util.find_spec("torch._dynamo.variables.invoke_subgraph")
    facts["dynamo_reuses_layer_traces"] = reuse is not None and hasattr(
        importlib.import_module("torch._dynamo.variables.invoke_subgraph"), "find_reuse_match")
    try:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaAttention
        config = LlamaConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=1)
        facts["attention_wrapped_by_kernels"] = hasattr(LlamaAttention(config, 0), "_kernel_funcs")
    except Exception as e:  # an older or newer transformers: report, do not guess
        facts["attention_wrapped_by_kernels"] = f"unknown ({type(e).__name__}: {e})"
    return facts


if __name__ == "__main__":
    print(json.dumps(probe(), indent=1))
