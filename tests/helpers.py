"""Tiny models and the compiled-vs-eager comparison used across the tests."""
from __future__ import annotations

import copy

import torch
from peft import LoraConfig, get_peft_model

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def token_batch(batch=2, seq=11, vocab=97, device=None, **extra) -> dict:
    """Random token ids as a causal-LM batch whose labels are its inputs (plus ``extra``)."""
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    return {"input_ids": ids, "labels": ids, **extra}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (NaN anywhere counts as infinitely wrong)."""
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def rounding_sensitivity(model, inputs: dict, loss_ref, grads_ref, draws: int = 3) -> float:
    """How far from the reference a correct float32 (or bf16, fp16) computation may land: the
    worst error of loss and LoRA gradients of ``model`` run eagerly with each adapted layer's
    output changed by one rounding (relative noise of the dtype's unit roundoff), over
    ``draws`` fixed noise draws.

    A fused op rounds where eager rounds, but not to the same bits. On tiny random models some
    gradients are ill-conditioned (rank 1 adapters, say): measured 2026-12-03, one-rounding
    noise on the adapter outputs of an eager fp32 Llama with r=1 moved its worst LoRA gradient
    from 2e-6 to 2.6e-5 of a float64 run, while eager's own rounding happened to land at 2e-6.
    Comparing compiled to eager alone then fails or passes by the luck of the CPU's summation
    order; this is the fair floor. A wrong formula is far above it (1e-3 and more)."""
    worst = 0.0
    for draw in range(draws):
        noisy = copy.deepcopy(model)
        gen = torch.Generator().manual_seed(1234 + draw)

        def one_rounding(_module, _args, out):
            u = torch.finfo(out.dtype).eps / 2
            noise = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device)
            return (out.double() * (1 + u * noise)).to(out.dtype)
        for module in noisy.modules():
            if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
                module.register_forward_hook(one_rounding)
        loss, grads = run_step(noisy, inputs)
        worst = max([worst, rel_err(loss, loss_ref)]
                    + [rel_err(grads[n], g) for n, g in grads_ref.items()])
    return worst


def with_lora(model, targets=ALL_LINEAR, r=4, dropout=0.0, **kw):
    """peft LoRA with B drawn at random (peft's zero init would make every A gradient zero)."""
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=dropout,
                     init_lora_weights=False, **kw)
    return get_peft_model(model, cfg)


def tiny_llama(layers=2, hidden=40, heads=4, kv_heads=2, inter=56, vocab=97, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, max_position_embeddings=128, **kw)
    return LlamaForCausalLM(cfg)


def mlp_block_case(m, k, f, r, dtype, device="cuda"):
    """``torch.ops.fastlora.lora_mlp_block`` on random [m, k] rows (width f, rank r, gate / up /
    down scales 0.5 / 0.7 / 1.5, SiLU, no bias, no dropout). Returns a namespace: the input
    ``x``; the frozen weights ``gw, uw, dw``; the adapters ``ga, gb, ua, ub, da, db`` (float32);
    the op's outputs ``y, bg, bu, xa, xa_d``; and ``backward(dy, x, bg, bu, xa, xa_d)``, the
    op's backward with those weights (dx and every adapter gradient)."""
    import types

    def rand(*shape, dtype=torch.float32):
        return (torch.randn(*shape, device=device) * 0.05).to(dtype)
    c = types.SimpleNamespace()
    c.x, c.gw, c.uw, c.dw = rand(m, k, dtype=dtype), rand(f, k, dtype=dtype), \
        rand(f, k, dtype=dtype), rand(k, f, dtype=dtype)
    c.ga, c.gb, c.ua, c.ub, c.da, c.db = rand(r, k), rand(f, r), rand(r, k), rand(f, r), \
        rand(r, f), rand(k, r)
    c.y, c.bg, c.bu, c.xa, c.xa_d = torch.ops.fastlora.lora_mlp_block(
        c.x, c.gw, None, c.ga, c.gb, c.uw, None, c.ua, c.ub, None, 0.5, 0.7, 0.0, "silu", dtype,
        c.dw, None, c.da, c.db, None, 1.5, 0.0, dtype)

    def backward(dy, x, bg, bu, xa, xa_d):
        return torch.ops.fastlora.lora_mlp_block_backward(
            dy, x, c.gw, c.ga, c.gb, c.uw, c.ua, c.ub, bg, bu, xa, None, 0.5, 0.7, 0.0, "silu",
            dtype, c.dw, c.da, c.db, xa_d, None, 1.5, 0.0, True, False, False)
    c.backward = backward
    return c


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad and p.grad is not None}


def checkpointed(model, inputs: dict) -> dict:
    """Gradient checkpointing as HF trains with it (non-reentrant) on ``model``; returns the
    inputs without the KV cache, which checkpointing turns off."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return {**inputs, "use_cache": False}


def run_step(model, inputs: dict, params_of=None):
    params_of = params_of if params_of is not None else model
    params_of.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), lora_grads(params_of)


def compare_compiled(model, inputs: dict, options: dict | None = None):
    """Loss and every trainable gradient, eager vs ``backend="fastlora"`` on a deep copy.

    Returns (loss relative error, {param: gradient relative error}, eager grads).
    """
    compiled_model = copy.deepcopy(model)
    loss_e, grads_e = run_step(model, inputs)
    opts = {"compiler": "aot_eager", "strict": True}
    opts.update(options or {})
    compiled = torch.compile(compiled_model, backend="fastlora", options=opts)
    loss_c, grads_c = run_step(compiled, inputs, compiled_model)
    assert grads_e, "the model has no trainable parameters with gradients"
    assert set(grads_e) == set(grads_c), "compiled and eager train different parameters"
    errs = {n: rel_err(grads_c[n], g) for n, g in grads_e.items()}
    return rel_err(loss_c, loss_e), errs, grads_e


def compare_low_precision(model32, inputs: dict, dtype=torch.bfloat16, options=None):
    """For bf16/fp16 models: the compiled model's error against the float32 model must not exceed
    the eager low-precision model's own error against it (rounding noise in the whole model is far
    above the 1e-2 kernel tolerance, so that is the fair bar). Returns (eager err, compiled err),
    each the larger of the loss error and the error of all trainable gradients together."""
    loss32, grads32 = run_step(model32, inputs)
    low_e = copy.deepcopy(model32).to(dtype)
    low_c = copy.deepcopy(model32).to(dtype)
    loss_e, grads_e = run_step(low_e, inputs)
    opts = {"compiler": "aot_eager", "strict": True}
    opts.update(options or {})
    compiled = torch.compile(low_c, backend="fastlora", options=opts)
    loss_c, grads_c = run_step(compiled, inputs, low_c)
    return _global_err(loss_e, grads_e, loss32, grads32), _global_err(loss_c, grads_c, loss32,
                                                                       grads32)


def _global_err(loss, grads, loss_ref, grads_ref) -> float:
    """max(loss error, error of all gradients taken as one vector): per-tensor maxima of tiny
    bf16 models are dominated by whichever small gradient rounding hits hardest."""
    names = sorted(grads_ref)
    flat = torch.cat([grads[n].double().flatten() for n in names])
    flat_ref = torch.cat([grads_ref[n].double().flatten() for n in names])
    return max(rel_err(loss, loss_ref), rel_err(flat, flat_ref))


def saved_activations(fn, inputs) -> tuple[int, list[tuple]]:
    """(bytes, shapes) of the distinct tensors autograd saves while ``fn()`` runs, leaving out
    ``inputs`` (weights, x, seeds: kept by the caller anyway)."""
    ptrs = {v.data_ptr() for v in inputs if isinstance(v, torch.Tensor)}
    saved = []

    def pack(tensor):
        if tensor.data_ptr() not in ptrs:
            saved.append(tensor)
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    unique = {s.data_ptr(): s for s in saved}.values()
    return sum(s.numel() * s.element_size() for s in unique), [tuple(s.shape) for s in unique]


def saved_of_shape(model, options: dict, inputs, shape: tuple) -> int:
    """How many distinct tensors of ``shape`` autograd keeps for backward in one training step
    of ``model`` (a copy) compiled through fastlora with ``options``; ``inputs()`` makes the
    batch. The model is compiled by a first step outside the count (hooks would see fakes)."""
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model), backend="fastlora", options=options)
    compiled(**inputs()).loss.backward()
    ptrs = set()

    def pack(t):
        if tuple(t.shape) == shape:
            ptrs.add(t.data_ptr())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = compiled(**inputs()).loss
    loss.backward()
    return len(ptrs)
