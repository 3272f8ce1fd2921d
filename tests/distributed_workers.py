"""Two gloo processes on the CPU for tests/test_distributed.py: a launcher that reports a child's
failure with its traceback and never hangs, and the work each rank does.

Each rank builds the same seeded model, trains one step on its half of the batch and saves
what the parent test checks (report counts and notes, gradients as one process sees them after
DDP's all-reduce or FSDP2's reduce-scatter) with ``torch.save``; the parent compares them with a
single process on the whole batch. The fused ops run their CPU reference kernels, as in
tests/test_trl.py: these tests are about graph capture and rewriting under the distributed
engines; the Triton kernels have their own tests.
"""
from __future__ import annotations

import copy
import datetime
import os
import pathlib
import time

import torch

import collector

WORLD = 2
OPTIONS = {"compiler": "aot_eager", "strict": True}
BUCKET_CAP_MB = 1  # DDPOptimizer's smallest: its first bucket is 1 MiB
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------- launching
def launch(worker: str, out_dir: pathlib.Path, timeout_s: float = 480) -> list[dict]:
    """Run ``WORKERS[worker]`` on ``WORLD`` spawned processes; returns each rank's results.

    The process group meets through a file in ``out_dir`` (no port to race for). A child that
    raises fails the call with its traceback; a run past ``timeout_s`` kills the children and
    fails with the ranks that finished. (``context.join`` raises as soon as one child fails,
    with its traceback, and terminates the others.)"""
    import torch.multiprocessing as mp

    out_dir.mkdir(parents=True, exist_ok=True)
    init = out_dir / "process_group"
    context = mp.start_processes(_entry, args=(worker, str(init), str(out_dir)), nprocs=WORLD,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{worker}: the {WORLD} processes ran past {timeout_s:.0f} s; "
                                   f"ranks done: {sorted(p.name for p in out_dir.glob('*.pt'))}")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def _entry(rank: int, worker: str, init: str, out_dir: str) -> None:
    os.environ.pop("TRITON_INTERPRET", None)  # the CPU reference kernels (see the docstring)
    torch.set_num_threads(1)
    collector.collect_less_often()
    import torch.distributed as dist

    started = time.perf_counter()
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:  # an exception here reaches the parent with this rank's traceback (start_processes)
        results = WORKERS[worker](rank)
        results["seconds"] = time.perf_counter() - started
        torch.save(results, pathlib.Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- the model
def model_and_batch():
    """A 2-layer Llama with LoRA on all seven projections, r=128: 4.2 MiB of adapters, so 1 MiB
    DDP buckets cut the graph in four, inside layers. Same seed, same model in every process."""
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from helpers import tiny_llama, with_lora

    torch.manual_seed(0)
    model = with_lora(tiny_llama(layers=2, hidden=256, heads=4, kv_heads=2, inter=512),
                      targets=LORA_TARGETS, r=128)
    ids = torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "labels": ids, "use_cache": False}


def shard(batch: dict, rank: int) -> dict:
    rows = batch["input_ids"].shape[0] // WORLD
    return {k: v[rank * rows:(rank + 1) * rows] if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def summary(reports) -> dict:
    return {"counts": reports.counts(), "graphs": len(reports),
            "notes": [note for r in reports for note in r.notes],
            "near_misses": [(n["pattern"], n["module"], n["reason"]) for n in
                            reports.near_misses()]}


def _grads(model) -> dict[str, torch.Tensor]:
    """Trainable gradients by name, whole tensors (an FSDP2 DTensor gradient is gathered)."""
    grads = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            grad = param.grad
            grads[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).clone()
    return grads


# ----------------------------------------------------------------------------- DDP
def ddp(rank: int) -> dict:
    """Two routes to a fastlora model under DDP with 1 MiB buckets:
    - ``fused_first``: compiled in place by fastlora.compile_for_trainer, then wrapped (as the
      HF Trainer does): fastlora fuses the whole graph and splits it at the buckets itself;
    - ``split_first``: ``torch.compile(DDP(model), backend="fastlora")``: Dynamo's DDPOptimizer
      splits first and the backend compiles each piece."""
    import fastlora
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, batch = model_and_batch()
    mine = shard(batch, rank)
    results = {}

    started = time.perf_counter()
    fused = copy.deepcopy(model)
    fastlora.clear_reports()
    fastlora.compile_for_trainer(fused, **OPTIONS)
    wrapped = DDP(fused, bucket_cap_mb=BUCKET_CAP_MB)
    wrapped(**mine).loss.backward()
    results["fused_first"] = {**summary(fastlora.reports(fused)), "grads": _grads(fused),
                              "seconds": time.perf_counter() - started}

    started = time.perf_counter()
    split = copy.deepcopy(model)
    fastlora.clear_reports()
    compiled = torch.compile(DDP(split, bucket_cap_mb=BUCKET_CAP_MB), backend="fastlora",
                             options=OPTIONS)
    compiled(**mine).loss.backward()
    results["split_first"] = {**summary(fastlora.reports(split)), "grads": _grads(split),
                              "all_graphs": len(fastlora.reports()),
                              "seconds": time.perf_counter() - started}
    return results


# ----------------------------------------------------------------------------- FSDP2
def fsdp2(rank: int) -> dict:
    """FSDP2 (``fully_shard``) on each decoder layer and the root, base weights and adapters
    sharded (the adapters trainable), compiled per layer or as a whole model."""
    import fastlora
    from torch.distributed.fsdp import fully_shard

    model, batch = model_and_batch()
    mine = shard(batch, rank)
    results = {}
    for how in ("per_layer", "whole_model"):
        started = time.perf_counter()
        sharded = copy.deepcopy(model)
        layers = sharded.base_model.model.model.layers
        full_shapes = sorted(tuple(p.shape) for p in layers[0].parameters())
        taken = []  # the parameter shapes each compiled graph takes

        def backend(gm, example_inputs):
            taken.append(sorted(tuple(t.shape) for t in example_inputs
                                if isinstance(t, torch.nn.Parameter)))
            return fastlora.fastlora_backend(gm, example_inputs, options=OPTIONS)

        fastlora.clear_reports()
        for layer in layers:
            fully_shard(layer)
            if how == "per_layer":
                layer.compile(backend=backend)
        fully_shard(sharded)
        if how == "whole_model":
            sharded.compile(backend=backend)
        q_weight = layers[0].self_attn.q_proj.base_layer.weight
        local_rows = q_weight.to_local().shape[0]
        sharded(**mine).loss.backward()
        results[how] = {**summary(fastlora.reports(sharded)), "grads": _grads(sharded),
                        "all_counts": fastlora.reports().counts(), "taken": taken,
                        "layer_shapes": full_shapes, "q_local_rows": local_rows,
                        "q_rows": q_weight.shape[0], "seconds": time.perf_counter() - started}
    return results


def ddp_and_fsdp2(rank: int) -> dict:
    """Both, in one launch: two processes start (imports, first compile) once."""
    return {"ddp": ddp(rank), "fsdp2": fsdp2(rank)}


WORKERS = {"ddp": ddp, "fsdp2": fsdp2, "ddp_and_fsdp2": ddp_and_fsdp2}
