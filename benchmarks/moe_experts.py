"""LoRA on MoE experts (peft ``target_parameters``), two measurements (``--mode``):

``layer`` (default): one MoE layer's experts, forward + backward, at Qwen3-30B-A3B's shapes
(tokens routed top-8 of 128 experts at random), written as peft + transformers compute them
(``baddbmm`` merge, ``torch._grouped_mm``, SwiGLU, ``baddbmm``, ``torch._grouped_mm``), as a
plain function: eager, inductor, fastlora (``lora_moe_experts`` x 2). Per variant: ms, peak GiB
above the inputs, and the gradients' relative error against eager float32.

``model``: a training step of a Qwen3-30B-A3B-shaped stack of a few layers, LoRA r=16 on
q/k/v/o and on both expert weights, bfloat16, random weights. peft 0.21 registers the
parametrization anew in every forward (a new class each time), so Dynamo recompiles the experts'
frame every step and per layer until its recompile limit (8), then runs it eagerly: the row
records the compiles (``frames_compiled``). Variants: ``eager`` (HF + peft), ``inductor``
(torch.compile), ``fastlora`` (torch.compile backend="fastlora"), ``fastlora-noexperts`` (the
``lora_moe_experts`` pattern off), each in its own process so peak memory is clean. Per
variant: step ms (median of the timed steps), tok/s, peak GiB (max_memory_allocated over the
timed steps), warm-up s, the loss of the first step (the same seed everywhere: compare it
across variants), the fused-op counts, and where the LoRA went (``lora_summary``: trainable
parameters in all and on the experts, peft's expert wrappers, the experts' forward).

``unsloth`` (model mode, GPU only; carry ``.whl_unsloth/``: run_gpu.sh installs it in a folder
only this variant's process sees) is Unsloth 2026.10's own path: base_model() (same seed, so
the first loss compares) written once to ``--cache`` by a process of its own, so the worker
imports Unsloth first; ``FastLanguageModel.from_pretrained(load_in_4bit=False, dtype=bfloat16)``
(qwen3_moe goes to its FastModel loader and unsloth_zoo's Qwen3-MoE patch), then
``get_peft_model`` with the other variants' targets (q/k/v/o, ``target_parameters`` on both
expert weights: the same adapter shapes, so ``lora_params`` matches; its default list with
gate/up/down_proj gave gate_up_proj rank 2r on its CPU loader, peft 0.21's v4-to-v5 MoE remap),
r=16, alpha 32, no dropout, no gradient checkpointing. Its experts forward (unsloth_zoo
temporary_patches/moe_utils.py) sorts the routed rows and runs ``torch._grouped_mm`` (backend
``grouped_mm``, its default where torch has it) with the expert LoRA applied apart (x @ A, then
@ B, grouped) instead of peft's merged weight; the MoE block runs eagerly in training
(torch.compiler.disable). ``unsloth-triton``: ``UNSLOTH_MOE_BACKEND=unsloth_triton`` (its Triton
grouped GEMM, autotuned on first use). Their rows add ``unsloth_version``, ``moe_backend``,
``experts_lora_separated`` (per expert weight: True, Unsloth's forward applied the LoRA; False,
it fell back to peft's merge; None, not measured) and ``gradient_checkpointing``. Without a GPU
or without Unsloth the row says why in its ``error``.

    python benchmarks/moe_experts.py                         # on the GPU: layer, 4 x 2048 tokens
    python benchmarks/moe_experts.py --mode model            # 4 layers, 4 x 2048
    python benchmarks/moe_experts.py --shape tiny --steps 2  # anywhere: a smoke test
    benchmarks/run_gpu.sh exec python3 benchmarks/moe_experts.py --mode model \
        --variants eager,inductor,fastlora,unsloth --out $OUT     # with Unsloth

Writes JSON lines to ``$OUT/moe_experts.jsonl`` (or ``--out``) and prints a table.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys

import _harness as h  # this folder is first on sys.path when a script of it runs

h.unshadow()  # benchmarks/kernels.py would shadow the `kernels` package transformers imports

SHAPES = {  # Qwen3-30B-A3B's layer (hidden 2048, 128 experts of width 768, top 8)
    "qwen3-30b-a3b": dict(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144,
                          num_experts=128, num_experts_per_tok=8, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, vocab_size=151936),
    "tiny": dict(hidden_size=64, moe_intermediate_size=32, intermediate_size=96, num_experts=8,
                 num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, vocab_size=256),
}
VARIANTS = ["eager", "inductor", "fastlora", "fastlora-noexperts"]
# Unsloth's variants (model mode): the UNSLOTH_MOE_BACKEND each sets (None: Unsloth's choice)
UNSLOTH = {"unsloth": None, "unsloth-triton": "unsloth_triton"}
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def base_model(args):
    """The random-weight Qwen3-MoE stack every model variant starts from (seed 0)."""
    import torch
    import transformers as T

    torch.manual_seed(0)
    cfg = T.Qwen3MoeConfig(**SHAPES[args.shape], num_hidden_layers=args.layers,
                           decoder_sparse_step=1, max_position_embeddings=max(4096, args.seq))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = T.Qwen3MoeForCausalLM(cfg).to(dtype)
    return model, cfg, device


def build(args):
    if args.variant in UNSLOTH:
        return build_unsloth(args)
    from peft import LoraConfig, get_peft_model

    model, cfg, device = base_model(args)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                      target_modules=ATTENTION, target_parameters=EXPERTS)
    model = get_peft_model(model, lora)
    model.train()
    return model, cfg, device


def checkpoint_path(args) -> pathlib.Path:
    return pathlib.Path(args.cache) / (f"qwen3-moe-{args.shape}-{args.layers}L-"
                                       f"{max(4096, args.seq)}pos-seed0")


def save_checkpoint(args) -> dict:
    """``--variant checkpoint``: base_model() on disk, with train_step's small tokenizer."""
    import torch
    path = checkpoint_path(args)
    model, _, _ = base_model(args)
    model.save_pretrained(path)
    h.sibling("train_step")._save_tokenizer(path)
    del model
    torch.cuda.empty_cache()
    return {"checkpoint": str(path)}


def build_unsloth(args):
    """Unsloth's path (module docstring). The checkpoint is written by a process of its own,
    so that here Unsloth is imported before transformers, as it asks."""
    import torch
    path = checkpoint_path(args)
    if not (path / "config.json").exists():
        subprocess.run(worker_cmd(args, "checkpoint"), check=True, stdout=subprocess.DEVNULL)
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(
        str(path), max_seq_length=args.seq, dtype=torch.bfloat16, load_in_4bit=False,
        use_gradient_checkpointing=False)
    model = FastLanguageModel.get_peft_model(
        model, r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
        target_modules=ATTENTION, target_parameters=EXPERTS, use_gradient_checkpointing=False)
    model.train()
    return model, model.config, "cuda"


def first_experts(model):
    """The first layer's experts module (transformers' Qwen3MoeExperts; peft wraps it)."""
    return next((m for m in model.modules() if type(m).__name__.endswith("MoeExperts")), None)


def lora_summary(model) -> dict:
    """Where the LoRA went: trainable parameters in all and on the experts, peft's expert
    wrappers (ParamWrapper, one per expert weight and layer), what peft targeted, and the
    experts' forward (its class's, and transformers' experts implementation)."""
    from peft.tuners.lora.layer import ParamWrapper

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    experts = first_experts(model)
    forward = getattr(type(experts), "forward", None)
    peft_cfg = model.peft_config["default"]
    targets = peft_cfg.target_modules
    return {"lora_params": sum(p.numel() for _, p in trainable),
            "experts_lora_params": sum(p.numel() for n, p in trainable if ".experts." in n),
            "experts_lora": bool(wrappers), "experts_lora_modules": len(wrappers),
            "lora_dtype": str(trainable[0][1].dtype) if trainable else None,
            "target_modules": targets if isinstance(targets, str) else sorted(targets or []),
            "target_parameters": sorted(peft_cfg.target_parameters or []),
            "experts_forward": forward and f"{forward.__module__}.{forward.__qualname__}",
            "experts_implementation": getattr(experts.config, "_experts_implementation", None)
            if hasattr(experts, "config") else None}


def unsloth_summary(model) -> dict:
    """What Unsloth ran (internals of its zoo, read after the steps)."""
    import unsloth

    row = {"unsloth_version": unsloth.__version__,
           "moe_backend_requested": os.environ.get("UNSLOTH_MOE_BACKEND"),
           "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False))}
    from unsloth_zoo.temporary_patches import moe_utils

    experts = first_experts(model)
    row["moe_backend"] = moe_utils.select_moe_backend()
    row["experts_lora_separated"] = {p: moe_utils.moe_lora_forward_applies_stash(experts, p)
                                     for p in ("gate_up_proj", "down_proj")}
    return row


def layer_inputs(args, device):
    """Expert-sorted rows x [S, H] (S = tokens * top-k), offs, frozen expert weights, the
    rank factors as peft hands them to the merge (its views: lhs [E, P, r], rhs [E, r, Q])."""
    import torch

    shape = SHAPES[args.shape]
    E, H, F, k = (shape[n] for n in ("num_experts", "hidden_size", "moe_intermediate_size",
                                     "num_experts_per_tok"))
    r, tokens = args.rank, args.batch * args.seq
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator().manual_seed(0)
    expert_ids = torch.rand(tokens, E, generator=gen).topk(k, dim=-1).indices.flatten()
    counts = torch.bincount(expert_ids, minlength=E)
    offs = counts.cumsum(0).to(torch.int32).to(device)

    def t(*size, scale=1.0, grad=False):
        return (torch.randn(*size, generator=gen) * scale).to(device, dtype).requires_grad_(grad)
    return dict(x=t(tokens * k, H, grad=True), offs=offs,
                w_gu=t(E, 2 * F, H, scale=H ** -0.5), lhs_gu=t(E, 2 * F, r, scale=0.05, grad=True),
                rhs_gu=t(E, r, H, scale=0.05, grad=True),
                w_d=t(E, H, F, scale=F ** -0.5), lhs_d=t(E, H, r, scale=0.05, grad=True),
                rhs_d=t(E, r, F, scale=0.05, grad=True))


def experts(x, offs, w_gu, lhs_gu, rhs_gu, w_d, lhs_d, rhs_d):
    """transformers' grouped experts forward with peft's merged weights (scaling 2)."""
    import torch
    import torch.nn.functional as F

    mm = torch._grouped_mm if x.dtype == torch.bfloat16 else \
        torch.ops.transformers.grouped_mm_fallback
    gate_up = mm(x, torch.baddbmm(w_gu, lhs_gu, rhs_gu, alpha=2.0).transpose(-2, -1), offs=offs)
    gate, up = gate_up.chunk(2, dim=-1)
    h = F.silu(gate) * up
    return mm(h, torch.baddbmm(w_d, lhs_d, rhs_d, alpha=2.0).transpose(-2, -1), offs=offs)


def layer_worker(args) -> dict:
    import torch
    import transformers.integrations.moe  # noqa: F401  (grouped_mm_fallback)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = layer_inputs(args, device)
    trainable = ["x", "lhs_gu", "rhs_gu", "lhs_d", "rhs_d"]
    if args.variant == "fastlora":
        import fastlora  # noqa: F401  (registers the backend: not installed on the GPU machine)
    fn = {"eager": lambda: experts, "inductor": lambda: torch.compile(experts),
          "fastlora": lambda: torch.compile(experts, backend="fastlora")}[args.variant]()
    g = torch.randn(inputs["x"].shape, generator=torch.Generator().manual_seed(1)).to(
        device, inputs["x"].dtype)

    def step():
        return torch.autograd.grad(fn(**inputs), [inputs[n] for n in trainable], g)

    timing = h.measure(step, max(args.warmup, 1), args.steps, device)
    grads = timing.last
    # accuracy: against the same function in float32, eagerly
    ref_inputs = {k: (v.detach().float().requires_grad_(k in trainable) if v.is_floating_point()
                      else v) for k, v in inputs.items()}
    ref = torch.autograd.grad(experts(**ref_inputs), [ref_inputs[n] for n in trainable],
                              g.float())
    errs = {n: ((a.float() - b).norm() / b.norm()).item() for n, a, b in zip(trainable, grads, ref)}
    row = {"mode": "layer", "variant": args.variant, "shape": args.shape, "rank": args.rank,
           "tokens": args.batch * args.seq, "ms": timing.median_s * 1e3,
           "warmup_s": timing.warmup_s, "rel_err_vs_fp32": errs, "device": device}
    if device == "cuda":
        row["peak_gib_above_inputs"] = (torch.cuda.max_memory_allocated()
                                        - timing.base_bytes) / 2**30
        row["gpu"] = torch.cuda.get_device_name()
    if args.variant == "fastlora":
        import fastlora
        row["matches"] = fastlora.reports().counts()
    return row


def worker(args) -> dict:
    import torch

    if args.mode == "layer":
        return layer_worker(args)
    if args.variant == "checkpoint":
        return save_checkpoint(args)
    if args.variant in UNSLOTH and not torch.cuda.is_available():
        return {"variant": args.variant, "error": "no CUDA GPU here: this row times Unsloth's "
                "GPU path (its CPU fallback, unsloth_zoo/cpu, is another loader without its "
                "MoE kernels)"}
    model, cfg, device = build(args)
    if args.variant == "inductor":
        step_model = torch.compile(model)
    elif args.variant.startswith("fastlora"):
        import fastlora  # noqa: F401
        options = {"disable": ["lora_moe_experts"]} if args.variant == "fastlora-noexperts" \
            else {}
        step_model = torch.compile(model, backend="fastlora", options=options or None)
    else:
        step_model = model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    gen = torch.Generator(device="cpu").manual_seed(1)
    vocab = SHAPES[args.shape]["vocab_size"]  # the same ids for every variant, Unsloth's too
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(device)

    def step():
        loss = step_model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    timing = h.measure(step, max(args.warmup, 1), args.steps, device)
    ms = timing.median_s * 1e3
    row = {"variant": args.variant, "shape": args.shape, "layers": args.layers,
           "batch": args.batch, "seq": args.seq, "rank": args.rank, "step_ms": ms,
           "tok_s": args.batch * args.seq / ms * 1e3, "warmup_s": timing.warmup_s,
           "first_loss": float(timing.first), "device": device}
    if device == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        row["gpu"] = torch.cuda.get_device_name()
    row["frames_compiled"] = dict(torch._dynamo.utils.counters["stats"])
    try:  # a summary that fails must not lose the timing
        row.update(lora_summary(model))
        if args.variant in UNSLOTH:
            row.update(unsloth_summary(model))
    except Exception as e:  # noqa: BLE001
        row["summary_error"] = f"{type(e).__name__}: {e}"[:200]
    if args.variant.startswith("fastlora"):
        import fastlora
        row["matches"] = fastlora.reports(model).counts()
        row["near_misses"] = sorted({f"{n['pattern']}: {n['reason']}"
                                     for n in fastlora.reports(model).near_misses()
                                     if n["pattern"] == "lora_moe_experts"})
        # graphs the backend got again unchanged (repeats.py): peft's per-forward
        # parametrization makes Dynamo recompile the experts' frames until recompile_limit
        from fastlora.repeats import PREFIX
        row["compiled_again"] = sum(any(n.startswith(PREFIX) for n in r.notes)
                                    for r in fastlora.reports(model))
    return row


def worker_cmd(args, variant: str) -> list[str]:
    return [sys.executable, __file__, "--worker", "--variant", variant] + [
        f"--{k}={getattr(args, k)}" for k in ("mode", "shape", "layers", "batch", "seq", "rank",
                                              "warmup", "steps", "cache")]


def unavailable(args, variant: str) -> str | None:
    """Why a variant cannot run here (one line), or None."""
    if variant not in UNSLOTH:
        return None
    if args.mode != "model":
        return "Unsloth has no experts-only function to time: --mode model only"
    missing = h.importable("unsloth")
    return f"{missing} (carry .whl_unsloth/ and run through benchmarks/run_gpu.sh)" \
        if missing else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mode", default="layer", choices=["layer", "model"])
    ap.add_argument("--shape", default="qwen3-30b-a3b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--variants", default=None, help=f"default: {','.join(VARIANTS)} "
                    f"(model), eager,inductor,fastlora (layer)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per variant")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--cache", default="/tmp/fastlora-bench",
                    help="unsloth: the random checkpoint it loads (written once)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        h.emit(worker(args))
        return
    if args.variants is None:
        args.variants = ",".join(VARIANTS if args.mode == "model" else VARIANTS[:3])
    results = h.Results(args.out, "moe_experts", echo=False)
    for variant in args.variants.split(","):
        missing = unavailable(args, variant)
        if missing:
            results.add({"variant": variant, "error": missing})
            continue
        env = h.unsloth_env("unsloth" if variant in UNSLOTH else variant)
        if UNSLOTH.get(variant):
            env["UNSLOTH_MOE_BACKEND"] = UNSLOTH[variant]
        results.add(h.run_worker(worker_cmd(args, variant), {"variant": variant}, args.timeout,
                                 results.path(f"_{variant}.log"), env))
    rows = results.rows
    if args.mode == "layer":
        columns = [("ms", 10, "ms", ".2f"), ("peak GiB", 10, "peak_gib_above_inputs", ".2f"),
                   ("worst grad err", 16, lambda r: max(r["rel_err_vs_fp32"].values()), ".1e"),
                   ("warm-up s", 11, "warmup_s", ".1f")]
    else:
        columns = [("step ms", 10, "step_ms", ".1f"), ("tok/s", 10, "tok_s", ".0f"),
                   ("peak GiB", 10, "peak_gib", ".2f"), ("warm-up s", 11, "warmup_s", ".1f"),
                   ("loss", 9, "first_loss", ".4f")]
    print(h.table(rows, [("variant", 20)], columns))
    for r in rows:  # the fused ops and (model) Dynamo's frame counts, a line each
        if r.get("matches") or r.get("frames_compiled"):
            print(f"{r['variant']:<20} {r.get('matches', '')} {r.get('frames_compiled', '')}"
                  + (f" compiled again: {r['compiled_again']}" if r.get('compiled_again') else ''))
    for r in rows:  # (model) the LoRA on the experts and the forward that ran them
        if "experts_lora" in r:
            extra = {k: r[k] for k in ("moe_backend", "experts_lora_separated") if k in r}
            print(f"{r['variant']:<20} experts LoRA: {r['experts_lora_modules']} wrappers, "
                  f"{r['experts_lora_params']} of {r['lora_params']} params; "
                  f"{r['experts_forward']} {extra or ''}")


if __name__ == "__main__":
    main()
