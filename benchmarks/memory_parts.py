"""A training step's memory, part by part: what the weights, adapters, gradients and optimizer
state hold, and what each phase of the step adds on top.

    python benchmarks/memory_parts.py --shape llama-8b --load-4bit --kbit-recipe bf16
        # the QLoRA row as Unsloth trains it (bf16 embeddings and lm_head), H200; without
        # --kbit-recipe: peft's recipe, float32 embeddings and lm_head (+1.96 GiB at 8B)
    python benchmarks/memory_parts.py --shape llama-8b                 # the LoRA row
    python benchmarks/memory_parts.py --shape tiny                     # CPU: the parameter parts

Workload: train_step.py's (its build_model: LoRA r16 on q,k,v,o,gate,up,down, bf16, batch
4 x 2048, fused AdamW; --load-4bit: bitsandbytes NF4 + double quantisation, --kbit-recipe as
there). Variants (--variants): ``fastlora`` (torch.compile backend="fastlora", default
options), ``fastlora-hostemb`` (compile_for_trainer with ``offload_embeddings=True``: the
frozen input embeddings in pinned host memory, listed apart) and ``eager``, each in its own
process. Per variant:

- parts, from the model's tensors: 4-bit base weights (bitsandbytes' packed uint8) and their
  quantisation state (absmax, code, nested state); the other frozen parameters by role:
  embeddings, lm_head, norms, linear weights (the bf16 base layers of the LoRA row), other;
  buffers; the LoRA parameters; their gradients (after a backward); the optimizer state (after
  the first optimizer step). Each with its dtypes;
- phases, measured after --warmup steps (compiles included) on one more step:
  ``torch.cuda.memory_allocated`` before it (the steady state: weights and optimizer state) and
  ``max_memory_allocated`` of each phase above that steady state, the peak counter reset
  between phases: forward, backward, optimizer step; and what stays after the forward (saved
  activations) and after the backward (gradients);
- sites, on a further step under ``torch.cuda.memory._record_memory_history``: the allocator's
  trace replayed, the blocks that step allocated and that are alive when their total is highest
  (blocks allocated before it are not in the trace), grouped by the deepest frame in fastlora,
  transformers, peft, bitsandbytes or inductor's generated code, largest first.

Without a GPU (``--shape tiny``) the model is float32 on the CPU: parts only, phases n/a.
Writes memory_parts.jsonl under --out and prints a table per variant.
"""
from __future__ import annotations

import argparse
import collections
import os
import pathlib
import sys

import _harness as h  # this folder is first on sys.path when a script of it runs

h.unshadow()
ts = h.sibling("train_step")
progress = h.progress_printer("memory_parts")
SITE_PACKAGES = ("fastlora", "transformers", "peft", "bitsandbytes", "torchinductor")


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _quant_state_tensors(state, found: dict) -> None:
    """The tensors of a bitsandbytes QuantState, its nested state2 included."""
    for value in vars(state).values():
        if hasattr(value, "data_ptr") and hasattr(value, "element_size"):
            found[value.data_ptr()] = value
        elif type(value).__name__ == "QuantState":
            _quant_state_tensors(value, found)


def _role(name: str) -> str:
    if "embed_tokens" in name or "wte" in name:
        return "embeddings"
    if "lm_head" in name:
        return "lm_head"
    if "norm" in name:
        return "norms"
    if name.endswith("weight") and ("proj" in name or "base_layer" in name):
        return "linear weights"
    return "other"


def parts(model, opt) -> dict:
    """{part: {"bytes", "count", "dtypes"}} of the model's tensors (module docstring)."""
    out = collections.defaultdict(lambda: {"bytes": 0, "count": 0, "dtypes": set()})
    quant = {}

    def add(part, t):
        out[part]["bytes"] += _nbytes(t)
        out[part]["count"] += 1
        out[part]["dtypes"].add(str(t.dtype).replace("torch.", ""))

    for name, p in model.named_parameters():
        if type(p).__name__ == "Params4bit":
            add("4-bit base weights", p)
            if getattr(p, "quant_state", None) is not None:
                _quant_state_tensors(p.quant_state, quant)
        elif p.requires_grad:
            add("LoRA parameters", p)
            if p.grad is not None:
                add("LoRA gradients", p.grad)
        elif p.device.type == "cpu" and p.is_pinned():  # offload_embeddings moved it there
            add(f"frozen, in pinned host memory: {_role(name)}", p)
        else:
            add(f"frozen: {_role(name)}", p)
    for t in quant.values():
        add("4-bit quantisation state", t)
    for _, b in model.named_buffers():
        add("buffers", b)
    for state in opt.state.values():
        for t in state.values():
            if hasattr(t, "element_size"):
                add("optimizer state", t)
    return {k: {**v, "gib": v["bytes"] / 2**30, "dtypes": sorted(v["dtypes"])}
            for k, v in out.items()}


def _site(frames: list[dict]) -> str:
    """The deepest frame (innermost first) in one of SITE_PACKAGES, as file:line (function)."""
    for f in frames:
        path = f.get("filename", "")
        pkg = next((p for p in SITE_PACKAGES if f"/{p}/" in path or f"/{p}_" in path), None)
        if pkg and "/benchmarks/" not in path:
            short = f"inductor code {path.rsplit('/', 1)[-1]}" if pkg == "torchinductor" \
                else path[path.rindex(f"/{pkg}") + 1:]
            return f"{short}:{f.get('line')} ({f.get('name')})"
    return "(no Python frame in those packages: autograd engine, C++ or torch)"


def peak_sites(step, top: int) -> dict:
    """One step under the allocator's history: the blocks alive at its highest point, by site."""
    import torch
    try:
        torch.cuda.memory._record_memory_history(enabled="all", context="all", stacks="python",
                                                 max_entries=2_000_000)
    except Exception as e:  # pragma: no cover - the API moved
        return {"error": f"_record_memory_history: {e}"}
    try:
        step()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    trace = snapshot["device_traces"][torch.cuda.current_device()]
    live, total, best, at_best = {}, 0, 0, {}
    for event in trace:
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], _site(event.get("frames", [])))
            total += event["size"]
            if total > best:
                best, at_best = total, dict(live)
        elif event["action"] in ("free_requested", "free") and event["addr"] in live:
            total -= live.pop(event["addr"])[0]
    by_site = collections.Counter()
    for size, site in at_best.values():
        by_site[site] += size
    return {"peak_above_start_gib": best / 2**30, "events": len(trace),
            "sites": [{"site": s, "gib": b / 2**30} for s, b in by_site.most_common(top)]}


def worker(args) -> dict:
    import torch
    device = h.default_device()
    cuda = device == "cuda"
    cfg = ts.build_config(args.shape)
    model, opt = ts.trainable(args, cfg)
    step_model = model
    if args.variant == "fastlora":
        import fastlora  # noqa: F401  (registers the backend name from a source tree)
        options = {} if cuda else {"compiler": "aot_eager"}
        step_model = torch.compile(model, backend="fastlora", options=options or None)
    elif args.variant == "fastlora-hostemb":  # the input embeddings read from host memory
        import fastlora
        options = {} if cuda else {"compiler": "aot_eager"}
        step_model = fastlora.compile_for_trainer(model, dynamic=None, offload_embeddings=True,
                                                  **options)
    gen = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device, generator=gen)
    forward = lambda: step_model(input_ids=ids, labels=ids, use_cache=False).loss  # noqa: E731

    def step():
        forward().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(args.warmup):
        progress(f"warm-up step {i + 1} of {args.warmup}" + (" (compiles)" if i == 0 else ""))
        step()
    row = {"shape": args.shape, "variant": args.variant, "batch": args.batch, "seq": args.seq,
           "gc": args.gc, "rank": args.rank, "load_4bit": args.load_4bit,
           "kbit_recipe": args.kbit_recipe if args.load_4bit else None,
           "device": torch.cuda.get_device_name() if cuda else "cpu"}
    phases = {}
    if cuda:
        progress("measuring the phases")
        gib = lambda: torch.cuda.memory_allocated() / 2**30  # noqa: E731
        torch.cuda.synchronize()
        steady = phases["steady_gib"] = gib()
        for name, run in (("forward", forward), ("backward", None), ("optimizer", opt.step)):
            torch.cuda.reset_peak_memory_stats()
            if name == "forward":
                loss = run()
            elif name == "backward":
                loss.backward()
                del loss
            else:
                run()
            torch.cuda.synchronize()
            phases[f"{name}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 - steady
            phases[f"after_{name}_gib"] = gib() - steady
        row["parts"] = parts(model, opt)  # gradients still there: counted
        opt.zero_grad(set_to_none=True)
        progress("recording the allocator's history for one step")
        row["peak_sites"] = peak_sites(step, args.top)
    else:
        forward().backward()
        opt.step()
        row["parts"] = parts(model, opt)
        opt.zero_grad(set_to_none=True)
    row["phases"] = phases
    return row


def run_one(args, variant: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--variant", variant, "--shape", args.shape,
           "--batch", str(args.batch), "--seq", str(args.seq), "--rank", str(args.rank),
           "--gc", args.gc, "--warmup", str(args.warmup), "--top", str(args.top),
           "--cache", args.cache, "--kbit-recipe", args.kbit_recipe]
    if args.load_4bit:
        cmd.append("--load-4bit")
    return h.run_worker(cmd, {"shape": args.shape, "variant": variant}, args.timeout,
                        pathlib.Path(args.out) / f"memory_parts_{args.shape}_{variant}.log")


def table(row: dict) -> str:
    head = f"{row['shape']} {row['variant']}" + (" 4-bit" if row.get("load_4bit") else "")
    if "error" in row:
        return f"{head}: n/a: {row['error']}"
    lines = [head, f"  {'part':<34}{'MiB':>11}{'tensors':>9}  dtypes"]
    for name, p in sorted(row["parts"].items(), key=lambda kv: -kv[1]["bytes"]):
        lines.append(f"  {name:<34}{p['bytes'] / 2**20:>11.1f}{p['count']:>9}  "
                     f"{','.join(p['dtypes'])}")
    phases = row.get("phases") or {}
    lines.append("  phases (GiB above the steady state): " + (", ".join(
        f"{k[:-4]} {v:.2f}" for k, v in phases.items()) or "n/a (no GPU)"))
    sites = row.get("peak_sites") or {}
    if sites.get("sites"):
        lines.append(f"  alive at the step's highest point ({sites['peak_above_start_gib']:.2f} "
                     f"GiB above its start), by site:")
        lines.extend(f"  {s['gib']:>9.3f}  {s['site']}" for s in sites["sites"])
    elif sites.get("error"):
        lines.append(f"  sites: n/a: {sites['error']}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", default="llama-8b", help=f"from {sorted(ts.SHAPES)}")
    ap.add_argument("--variants", default="fastlora,eager")
    ts.add_workload_args(ap, gc_help="gradient checkpointing (auto: train_step.py's default "
                                     "of the shape)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--top", type=int, default=12, help="allocation sites listed")
    ap.add_argument("--timeout", type=int, default=270, help="seconds per variant")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--cache", default="/tmp/fastlora-bench", help="random checkpoint (4-bit)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.gc == "auto":
        args.gc = "on" if ts.SHAPES[args.shape][2] else "off"
    if args.worker:
        args.gc = args.gc == "on"
        h.emit(worker(args))
        return
    results = h.Results(args.out, "memory_parts")
    for variant in args.variants.split(","):
        results.add(run_one(args, variant))
    print("\n\n".join(table(r) for r in results.rows))


if __name__ == "__main__":
    main()
