"""The README's first example: a tiny Llama + LoRA compiled with backend="fastlora"."""
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

torch.manual_seed(0)
config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
model = get_peft_model(LlamaForCausalLM(config),
                       LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
cmodel = torch.compile(model, backend="fastlora")     # no `import fastlora` needed
ids = torch.randint(0, 128, (2, 16))
loss = cmodel(input_ids=ids, labels=ids, use_cache=False).loss
loss.backward()

import fastlora  # noqa: E402

print(fastlora.last_report())
print(fastlora.last_report().counts())
