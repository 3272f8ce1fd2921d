"""fastlora export: the peft merge, the Hugging Face folder, and a GGUF round trip read back with
gguf.GGUFReader (tensors, names, metadata, vocabulary), plus the rotary reordering's meaning."""
import json

import numpy as np
import pytest
import torch

from fastlora.app import embedded
from fastlora.app.errors import FastloraError
from fastlora.app.export import export, gguf_rows, hf_rows, llama3_rope_factors
from helpers import tiny_llama, with_lora

gguf = pytest.importorskip("gguf")


def _field(reader, key):
    field = reader.fields[key]
    return field.contents()


def _adapter(tmp_path, layers=2, **llama_kw):
    """A tiny Llama with the embedded tokenizer, a trained-looking (random B) adapter on every
    linear layer, saved like fastlora train saves it. Returns (adapter dir, peft model)."""
    tokenizer = embedded.load_tokenizer()
    base = tiny_llama(layers=layers, hidden=32, heads=4, kv_heads=2, inter=48,
                      vocab=len(tokenizer), **llama_kw)
    base_dir = tmp_path / "run" / "base_model"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    model = with_lora(base, r=4)
    model.save_pretrained(tmp_path / "run")
    tokenizer.save_pretrained(tmp_path / "run")
    return tmp_path / "run", model


def test_gguf_rows_turns_rotate_half_into_adjacent_pairs():
    """A rotation of neighbours (2i, 2i+1) on the reordered rows equals HF's rotate_half rotation
    of (i, i + d/2) on the original rows, head by head."""
    heads, d, width = 3, 8, 5
    w = torch.randn(heads * d, width, dtype=torch.float64)
    x = torch.randn(width, dtype=torch.float64)
    angle = torch.rand(d // 2, dtype=torch.float64) * 6
    cos, sin = angle.cos(), angle.sin()
    q = (w @ x).view(heads, d)
    first, second = q[:, : d // 2], q[:, d // 2:]
    hf = torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)
    p = (gguf_rows(w, heads) @ x).view(heads, d // 2, 2)
    ggml = torch.stack([p[..., 0] * cos - p[..., 1] * sin, p[..., 1] * cos + p[..., 0] * sin], -1)
    assert torch.allclose(ggml.reshape(heads, d), hf.view(heads, 2, d // 2).transpose(1, 2)
                          .reshape(heads, d))
    assert torch.equal(hf_rows(gguf_rows(w, heads), heads), w)
    assert not torch.equal(gguf_rows(w, heads), w)


def test_llama3_rope_factors_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
               "rope_theta": 500000.0}
    config = LlamaConfig(hidden_size=256, num_attention_heads=2, rope_parameters=scaling,
                         max_position_embeddings=131072)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    dim = 128
    plain = 1.0 / (500000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    factors = torch.tensor(llama3_rope_factors(config), dtype=torch.float64)
    assert factors.shape == (dim // 2,) and factors.min() == 1.0 and factors.max() == 8.0
    assert torch.allclose(plain / factors, scaled.double(), rtol=1e-5)


def test_export_merges_through_peft_and_gguf_round_trips(tmp_path):
    adapter, peft_model = _adapter(tmp_path)
    ids = torch.randint(0, 500, (2, 9))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    out = export(adapter, dtype="fp32", gguf_path=tmp_path / "m.gguf", gguf_dtype="f32")
    assert out["merged"] == str(adapter / "merged")

    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(adapter / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(adapter / "base_model")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(merged.state_dict()[q], base.state_dict()[q])  # the merge changed it

    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    cfg = merged.config
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.block_count") == 2
    assert _field(reader, "llama.embedding_length") == 32
    assert _field(reader, "llama.feed_forward_length") == 48
    assert _field(reader, "llama.attention.head_count") == 4
    assert _field(reader, "llama.attention.head_count_kv") == 2
    assert _field(reader, "llama.rope.dimension_count") == 8
    assert _field(reader, "llama.context_length") == cfg.max_position_embeddings
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(
        cfg.rms_norm_eps)
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(10000.0)
    assert _field(reader, "general.file_type") == int(gguf.LlamaFileType.ALL_F32)
    tokenizer = embedded.load_tokenizer()
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"  # llama.cpp's spelling
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == len(tokenizer) == _field(reader, "llama.vocab_size")
    assert all(tokens[i] == t for t, i in tokenizer.get_vocab().items())
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    assert len(_field(reader, "tokenizer.ggml.merges")) == len(spec["model"]["merges"])
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[tokenizer.eos_token_id] == int(gguf.TokenType.CONTROL)
    assert types[300] == int(gguf.TokenType.NORMAL)
    assert _field(reader, "tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert _field(reader, "tokenizer.chat_template") == tokenizer.chat_template

    state = merged.state_dict()
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == len(state) == 2 + 2 * 9 + 1  # embed, lm_head, 9 per layer, final norm
    for name, want in [("token_embd.weight", state["model.embed_tokens.weight"]),
                       ("output.weight", state["lm_head.weight"]),
                       ("output_norm.weight", state["model.norm.weight"]),
                       ("blk.1.attn_v.weight", state["model.layers.1.self_attn.v_proj.weight"]),
                       ("blk.1.attn_output.weight", state["model.layers.1.self_attn.o_proj.weight"]),
                       ("blk.0.ffn_gate.weight", state["model.layers.0.mlp.gate_proj.weight"]),
                       ("blk.0.ffn_up.weight", state["model.layers.0.mlp.up_proj.weight"]),
                       ("blk.0.ffn_down.weight", state["model.layers.0.mlp.down_proj.weight"]),
                       ("blk.0.attn_norm.weight", state["model.layers.0.input_layernorm.weight"]),
                       ("blk.0.ffn_norm.weight",
                        state["model.layers.0.post_attention_layernorm.weight"])]:
        t = tensors[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(t.shape) == list(reversed(want.shape))  # GGML lists the fastest axis first
        assert np.array_equal(np.asarray(t.data).reshape(want.shape), want.numpy()), name
    for i in range(2):
        q = torch.from_numpy(np.array(tensors[f"blk.{i}.attn_q.weight"].data)).reshape(32, 32)
        k = torch.from_numpy(np.array(tensors[f"blk.{i}.attn_k.weight"].data)).reshape(16, 32)
        assert torch.equal(hf_rows(q, 4), state[f"model.layers.{i}.self_attn.q_proj.weight"])
        assert torch.equal(hf_rows(k, 2), state[f"model.layers.{i}.self_attn.k_proj.weight"])
    assert not list(tmp_path.rglob("*.partial"))


@pytest.mark.parametrize("kind", ["f16", "bf16"])
def test_gguf_16_bit_tensors(tmp_path, kind):
    adapter, _ = _adapter(tmp_path, layers=1, tie_word_embeddings=True)
    export(adapter, dtype="bf16", gguf_path=tmp_path / "m.gguf", gguf_dtype=kind)
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(adapter / "merged", dtype=torch.float32)
    from safetensors.torch import load_file
    saved = load_file(adapter / "merged" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    want = merged.state_dict()["model.layers.0.mlp.up_proj.weight"]
    t = tensors["blk.0.ffn_up.weight"]
    raw = np.array(t.data)
    if kind == "f16":
        assert t.tensor_type == gguf.GGMLQuantizationType.F16
        got = torch.from_numpy(raw.astype(np.float32))
    else:
        assert t.tensor_type == gguf.GGMLQuantizationType.BF16
        bits = raw.view(np.uint16).astype(np.uint32) << 16
        got = torch.from_numpy(bits.view(np.float32))
    got = got.reshape(want.shape)
    assert torch.allclose(got, want, rtol=1e-2, atol=1e-3)  # the weights are bf16 already
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_export_errors_are_clear_and_leave_nothing(tmp_path):
    with pytest.raises(FastloraError, match="does not exist"):
        export(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FastloraError, match="no adapter_config.json"):
        export(tmp_path / "plain")
    adapter, _ = _adapter(tmp_path, layers=1)
    (adapter / "merged").mkdir()
    with pytest.raises(FastloraError, match="already exists"):
        export(adapter)


def test_gguf_refuses_other_architectures_before_writing(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = embedded.load_tokenizer()
    base = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32,
                                        intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2))
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "run")
    tokenizer.save_pretrained(tmp_path / "run")
    with pytest.raises(FastloraError, match="Llama-architecture models .* 'qwen2'"):
        export(tmp_path / "run", base=str(tmp_path / "base"), gguf_path=tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "run" / "merged").exists()


def test_pre_tokenizer_names_llama_cpp_reads():
    """gpt-2 for a plain byte-level BPE; llama-bpe for Llama 3's split pattern; nothing (llama.cpp
    falls back to its default, with a note) for a split it would tokenize differently."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from fastlora.app.export import _pre_tokenizer_name

    def spec(pre):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre
        return json.loads(tok.to_str())

    llama3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
              r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    qwen2 = llama3.replace(r"\p{N}{1,3}", r"\p{N}")
    split = lambda pattern: pre_tokenizers.Sequence([  # noqa: E731
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    assert _pre_tokenizer_name(spec(pre_tokenizers.ByteLevel(add_prefix_space=False))) == "gpt-2"
    assert _pre_tokenizer_name(spec(split(llama3))) == "llama-bpe"
    assert _pre_tokenizer_name(spec(split(qwen2))) is None
    assert _pre_tokenizer_name(spec(pre_tokenizers.Whitespace())) is None
