"""Families beyond tests/test_families.py, tried as a new user would: a tiny random model of each,
LoRA on every linear layer (peft's "all-linear"), a padded batch, one training step through
``fastlora.compile_for_trainer`` against eager, in float32 and bfloat16. Prints, per family and
dtype, what fused, the near misses with their reasons, and the loss and gradient errors of eager
and compiled against a float64 copy (float32 for the MoE families, whose grouped GEMMs take no
float64). No GPU needed::

    python benchmarks/family_sweep.py                 # every family below
    python benchmarks/family_sweep.py gpt_oss olmo2   # some

Writes family_sweep.jsonl under --out. A finding here becomes a test in tests/ once fixed (the
seventeenth session's: OLMo 2 and Helium's RMSNorm, Helium's and ERNIE 4.5's RoPE in bf16,
GPT-OSS's RoPE and sink attention, GELU MLPs reported as GLU near misses).
"""
from __future__ import annotations

import argparse
import copy
import pathlib
import sys

import _harness as h  # this folder is first on sys.path when a script of it runs

h.unshadow()

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
TWO_KINDS = dict(sliding_window=5, layer_types=["sliding_attention", "full_attention"])
MOE = dict(num_local_experts=4, num_experts_per_tok=2)


def families() -> dict:
    """name: (model class, config class, config kwargs)."""
    import transformers as T
    neox = {k: v for k, v in SMALL.items() if k != "num_key_value_heads"}
    return {
        "olmo2": (T.Olmo2ForCausalLM, T.Olmo2Config, SMALL),
        "helium": (T.HeliumForCausalLM, T.HeliumConfig, {**SMALL, "head_dim": 8}),
        "ernie4_5": (T.Ernie4_5ForCausalLM, T.Ernie4_5Config, SMALL),
        "smollm3": (T.SmolLM3ForCausalLM, T.SmolLM3Config,
                    {**SMALL, "no_rope_layer_interval": 2, "pad_token_id": 0, "bos_token_id": 1,
                     "eos_token_id": 2}),
        "glm4": (T.Glm4ForCausalLM, T.Glm4Config, {**SMALL, "pad_token_id": 0, "eos_token_id": 1}),
        "exaone4": (T.Exaone4ForCausalLM, T.Exaone4Config, SMALL),
        "seed_oss": (T.SeedOssForCausalLM, T.SeedOssConfig, SMALL),
        "arcee": (T.ArceeForCausalLM, T.ArceeConfig, SMALL),
        "apertus": (T.ApertusForCausalLM, T.ApertusConfig, SMALL),
        "hunyuan": (T.HunYuanDenseV1ForCausalLM, T.HunYuanDenseV1Config, {**SMALL, "head_dim": 8}),
        "phi": (T.PhiForCausalLM, T.PhiConfig, SMALL),
        "gpt_neox": (T.GPTNeoXForCausalLM, T.GPTNeoXConfig, {**neox, "rotary_pct": 0.5}),
        "falcon": (T.FalconForCausalLM, T.FalconConfig,
                   {"vocab_size": 97, "hidden_size": 32, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "new_decoder_architecture": True,
                    "num_kv_heads": 2}),
        "starcoder2": (T.Starcoder2ForCausalLM, T.Starcoder2Config, SMALL),
        "cohere2": (T.Cohere2ForCausalLM, T.Cohere2Config, {**SMALL, **TWO_KINDS}),
        "gpt_oss": (T.GptOssForCausalLM, T.GptOssConfig,
                    {**SMALL, **TWO_KINDS, **MOE, "head_dim": 8}),
        "granitemoe": (T.GraniteMoeForCausalLM, T.GraniteMoeConfig, {**SMALL, **MOE}),
        "qwen2_moe": (T.Qwen2MoeForCausalLM, T.Qwen2MoeConfig,
                      {**SMALL, "num_experts": 4, "num_experts_per_tok": 2,
                       "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16}),
    }


def padded_batch():
    import torch
    ids = torch.randint(0, 97, (2, 13))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "use_cache": False,
            "labels": ids.masked_fill(mask == 0, -100)}


def step(model, inputs):
    """(loss, {name: gradient}) of one step."""
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                           if p.requires_grad and p.grad is not None}


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float("inf") if not a.isfinite().all() else ((a - b).norm() / b.norm().clamp_min(
        1e-30)).item()


def sweep_one(name: str, dtype) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    import fastlora
    model_cls, config_cls, kwargs = families()[name]
    torch.manual_seed(0)
    model = get_peft_model(model_cls(config_cls(**kwargs)), LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)).to(dtype)
    model.train()
    inputs = padded_batch()
    moe = any(k in kwargs for k in ("num_local_experts", "num_experts"))
    loss_ref, grads_ref = step(copy.deepcopy(model).to(torch.float32 if moe else torch.float64),
                               inputs)
    loss_e, grads_e = step(model, inputs)
    fastlora.clear_reports()
    torch._dynamo.reset()
    compiled = fastlora.compile_for_trainer(copy.deepcopy(model))
    loss_c, grads_c = step(compiled, inputs)
    reports = fastlora.reports(compiled)
    fused: dict[str, int] = {}
    for report in reports:
        for pattern, count in report.counts().items():
            fused[pattern] = fused.get(pattern, 0) + count
    return {"family": name, "dtype": str(dtype).replace("torch.", ""), "graphs": len(reports),
            "fused": fused,
            "near_misses": sorted({f"{n['pattern']}: {n['reason']}" for r in reports
                                   for n in r.near_misses}),
            "loss_err_eager": rel_err(loss_e, loss_ref), "loss_err_compiled": rel_err(
                loss_c, loss_ref),
            "grad_err_eager": max(rel_err(grads_e[n], g) for n, g in grads_ref.items()),
            "grad_err_compiled": max(rel_err(grads_c[n], g) for n, g in grads_ref.items())}


def main():
    import torch
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("families", nargs="*", help="names (default: all)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    names = args.families or list(families())
    out = pathlib.Path(args.out) / "family_sweep.jsonl"
    for name in names:
        for dtype in (torch.float32, torch.bfloat16):
            try:
                row = sweep_one(name, dtype)
            except Exception as e:  # a family this transformers cannot build: say so, go on
                row = {"family": name, "dtype": str(dtype), "error": f"{type(e).__name__}: {e}"}
            h.append_jsonl(out, row)
            if "error" in row:
                print(f"{name:11s} {row['dtype']:9s} ERROR {row['error'][:200]}")
                continue
            print(f"{name:11s} {row['dtype']:9s} graphs={row['graphs']} "
                  f"grad err eager {row['grad_err_eager']:.1e} compiled "
                  f"{row['grad_err_compiled']:.1e}  {row['fused']}")
            for miss in row["near_misses"]:
                print(f"    near miss  {miss[:160]}")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
