"""Tiny quantized models for the QLoRA tests (test_qlora.py, test_qlora_recipes.py): Llamas
whose decoder linears are bitsandbytes 4-bit or 8-bit layers, their float32 twins, peft's and
TRL's k-bit recipes, and the error of a step against the twin. Import after
``pytest.importorskip("bitsandbytes")``."""
import copy

import bitsandbytes as bnb
import bitsandbytes.functional as BF
import torch
from torch import nn

import fastlora
from helpers import rel_err, run_step, token_batch, with_lora


def only_lora():
    keep = ("lora_linear", "lora_linear_4bit")
    others = [p.name for p in fastlora.registered_patterns() if p.name not in keep]
    return {"compiler": "aot_eager", "strict": True, "disable": others}


def quantize_linears(model, kind="4bit", quant_type="nf4", double=True, dtype=torch.bfloat16):
    """Replace the decoder's nn.Linear layers by bitsandbytes 4-bit (or 8-bit) ones, the way
    ``from_pretrained(quantization_config=BitsAndBytesConfig(...))`` builds them."""
    for module in list(model.model.layers.modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            if kind == "4bit":
                q = bnb.nn.Linear4bit(child.in_features, child.out_features,
                                      bias=child.bias is not None, compute_dtype=dtype,
                                      quant_type=quant_type, compress_statistics=double)
                q.weight = bnb.nn.Params4bit(child.weight.data.float(), requires_grad=False,
                                             quant_type=quant_type, compress_statistics=double,
                                             blocksize=64)
            else:
                q = bnb.nn.Linear8bitLt(child.in_features, child.out_features,
                                        bias=child.bias is not None, has_fp16_weights=False)
                q.weight = bnb.nn.Int8Params(child.weight.data.float(), requires_grad=False,
                                             has_fp16_weights=False)
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.to(dtype), requires_grad=False)
            setattr(module, name, q.to(child.weight.device))
    return model


def float_twin(qmodel):
    """A float32 model computing what ``qmodel`` computes (dequantized weights, same adapters)."""
    twin = copy.deepcopy(qmodel)
    for module in list(twin.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                w = BF.dequantize_4bit(child.weight.data, child.weight.quant_state).float()
            elif isinstance(child, bnb.nn.Linear8bitLt):
                w = child(torch.eye(child.in_features, dtype=torch.bfloat16)).float().T
                if child.bias is not None:
                    w = w - child.bias.float()[:, None]
            else:
                continue
            lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
            lin.weight = nn.Parameter(w.contiguous(), requires_grad=False)
            if child.bias is not None:
                lin.bias = nn.Parameter(child.bias.data.float(), requires_grad=False)
            setattr(module, name, lin)
    return twin.float()


def batch():
    return token_batch()


def worst(loss, grads, loss_r, grads_r) -> float:
    """The largest relative error of a step's loss and gradients against the twin's."""
    return max([rel_err(loss, loss_r)] + [rel_err(grads[n], g) for n, g in grads_r.items()])


def errors(qmodel, inputs, twin=None):
    twin = twin if twin is not None else float_twin(qmodel)
    loss_r, grads_r = run_step(twin, inputs)
    compiled_model = copy.deepcopy(qmodel)
    loss_e, grads_e = run_step(qmodel, inputs)
    compiled = torch.compile(compiled_model, backend="fastlora", options=only_lora())
    loss_c, grads_c = run_step(compiled, inputs, compiled_model)

    return worst(loss_e, grads_e, loss_r, grads_r), worst(loss_c, grads_c, loss_r, grads_r)


def answer_autocast_for_the_cpu(monkeypatch):
    """peft's bitsandbytes layers ask torch.is_autocast_enabled() with no device, which means
    CUDA: answered for the CPU, so that CPU autocast stands in for a GPU Trainer's bf16=True."""
    asks = torch.is_autocast_enabled
    monkeypatch.setattr(torch, "is_autocast_enabled",
                        lambda *device: asks(*device) if device else asks("cpu"))


def kbit_recipe(qmodel, adapters="bf16"):
    """``qmodel`` prepared as a quantized model is trained: peft's kbit preparation (float32
    activations), LoRA, and the adapters stored in bfloat16 (``adapters="bf16"``, what TRL's
    SFTTrainer does) or left float32 (``"fp32"``: peft's recipe, a plain Trainer)."""
    from peft import prepare_model_for_kbit_training
    model = with_lora(prepare_model_for_kbit_training(qmodel, use_gradient_checkpointing=False))
    for param in model.parameters():
        if param.requires_grad and adapters == "bf16":
            param.data = param.data.to(torch.bfloat16)
    return model


def seeded_batch():
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids, "labels": ids}
