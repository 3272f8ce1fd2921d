"""``fastlora export``: merge a LoRA adapter into its base model and write it out.

1. The merge goes through peft (``PeftModel.from_pretrained(...).merge_and_unload()``) in float32,
   then the merged weights are cast to bf16 / fp16 (or kept fp32) and saved in Hugging Face format
   with the tokenizer.
2. Optionally a GGUF file for llama.cpp-compatible runtimes (``gguf`` package): Llama-architecture
   models (``llama``, ``mistral``), llama.cpp's tensor names (from ``gguf``'s own name map), its
   metadata keys, the byte-level BPE vocabulary, and q/k weights reordered for GGML's rotary
   layout (below).

Every output is written under a temporary name and renamed when complete.

Rotary layout: Hugging Face Llama rotates dimension i of a head with dimension i + d/2
("rotate_half"); GGML rotates neighbours 2i and 2i+1. So the rows of each head of q_proj and
k_proj are reordered from [x_0 .. x_{d/2-1}, y_0 .. y_{d/2-1}] to [x_0, y_0, x_1, y_1, ...]:
``w.view(heads, 2, d/2, in).transpose(1, 2)``; ``hf_rows`` undoes it.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import shutil

from .errors import FastloraError

GGUF_ARCHS = {"llama": "llama", "mistral": "llama"}  # HF model_type -> llama.cpp architecture
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


# ----------------------------------------------------------------------------- merge
def _adapter_config(adapter_dir: pathlib.Path) -> dict:
    if not adapter_dir.is_dir():
        raise FastloraError(f"The adapter folder {adapter_dir} does not exist.",
                            "Pass the folder fastlora train saved (it holds "
                            "adapter_config.json).")
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.exists():
        hint = " (it holds a finished merge)" if (adapter_dir / "config.json").exists() else ""
        raise FastloraError(f"The folder {adapter_dir} has no adapter_config.json, so it is not "
                            f"a LoRA adapter{hint}.",
                            "Pass the folder fastlora train saved.")
    return json.loads(config_file.read_text())


def _base_path(adapter_dir: pathlib.Path, config: dict, base: str | None) -> str:
    if base:
        return base
    named = config.get("base_model_name_or_path")
    beside = adapter_dir / "base_model"  # the embedded default model is saved beside its adapter
    if named and (pathlib.Path(named).exists() or not beside.exists()):
        return named
    if beside.exists():
        return str(beside)
    raise FastloraError(f"The adapter in {adapter_dir} does not name its base model.",
                        "Pass it with --base.")


def merge(adapter_dir, base: str | None = None, dtype: str = "bf16"):
    """The adapter merged into its base model by peft; returns (model, tokenizer, base path)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir = pathlib.Path(adapter_dir)
    config = _adapter_config(adapter_dir)
    base_path = _base_path(adapter_dir, config, base)
    try:
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise FastloraError(f"Could not load the base model {base_path!r} named by the adapter "
                            f"({str(e).strip().splitlines()[0]}).",
                            "Pass the base model's folder or hub id with --base.") from e
    try:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as e:
        raise FastloraError(f"The adapter in {adapter_dir} does not fit the base model "
                            f"{base_path!r} ({str(e).strip().splitlines()[0]}).",
                            "Pass the model it was trained on with --base.") from e
    model = model.to(getattr(torch, _DTYPES[dtype]))
    source = adapter_dir if (adapter_dir / "tokenizer_config.json").exists() else base_path
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    return model, tokenizer, base_path


def _fresh(path: pathlib.Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FastloraError(f"{path} already exists.", "Pass --overwrite to replace it, or "
                                                       "another path.")


def _replace(tmp: pathlib.Path, final: pathlib.Path) -> None:
    if final.exists():
        if final.is_dir():
            shutil.rmtree(final)
        else:
            final.unlink()
    os.replace(tmp, final)


def export(adapter_dir, out=None, base: str | None = None, dtype: str = "bf16",
           gguf_path=None, gguf_dtype: str | None = None, overwrite: bool = False,
           stream=None) -> dict:
    """Merge ``adapter_dir`` into its base, save the merged model in ``out`` (default
    ``adapter_dir/merged``) and, with ``gguf_path``, a GGUF file. Returns what was written."""
    say = lambda text: print(text, file=stream, flush=True)  # noqa: E731
    adapter_dir = pathlib.Path(adapter_dir)
    out = pathlib.Path(out) if out else adapter_dir / "merged"
    if dtype not in _DTYPES:
        raise FastloraError(f"Unknown dtype {dtype!r}.", "Use bf16, fp16 or fp32.")
    _adapter_config(adapter_dir)
    _fresh(out, overwrite)
    if gguf_path:
        gguf_path = pathlib.Path(gguf_path)
        _fresh(gguf_path, overwrite)
        try:
            import gguf  # noqa: F401
        except ImportError as e:
            raise FastloraError("--gguf needs the gguf package, which is not installed.",
                                "Install it with pip install 'fastlora[export]', or export "
                                "without --gguf.") from e
    model, tokenizer, base_path = merge(adapter_dir, base, dtype)
    if gguf_path:
        check_gguf_support(model.config)  # before writing anything
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _replace(tmp, out)
    say(f"merged   {adapter_dir} into {base_path} ({dtype}) -> {out}")
    written = {"merged": str(out), "base": base_path}
    if gguf_path:
        kind = gguf_dtype or ("f32" if dtype == "fp32" else "f16")
        info = write_gguf(model, tokenizer, gguf_path, kind)
        say(f"gguf     {gguf_path}: {info['tensors']} tensors, {kind}, llama.cpp architecture "
            f"{info['architecture']}, tokenizer {info['tokenizer']}"
            + (f" (pre-tokenizer {info['pre']})" if info.get("pre") else ""))
        for note in info["notes"]:
            say(f"note     {note}")
        written["gguf"] = str(gguf_path)
    return written


# ----------------------------------------------------------------------------- GGUF
def check_gguf_support(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in GGUF_ARCHS:
        raise FastloraError(
            f"GGUF export supports Llama-architecture models ({', '.join(GGUF_ARCHS)}); this "
            f"model is {model_type!r}.",
            "Export without --gguf and convert the merged folder with llama.cpp's "
            "convert_hf_to_gguf.py.")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise FastloraError("GGUF export does not handle Llama models with attention or MLP "
                            "biases.", "Export without --gguf and convert the merged folder "
                                       "with llama.cpp's convert_hf_to_gguf.py.")
    scaling = _rope_scaling(config)
    if scaling and scaling.get("rope_type", scaling.get("type")) not in ("llama3", "linear",
                                                                          "default"):
        raise FastloraError(f"GGUF export does not handle rope scaling {scaling!r}.",
                            "Export without --gguf and convert the merged folder with llama.cpp's "
                            "convert_hf_to_gguf.py.")


def _rope_scaling(config) -> dict | None:
    scaling = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None)
    if not scaling or scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        return None
    return dict(scaling)


def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        params = getattr(config, "rope_parameters", None) or {}
        theta = params.get("rope_theta", 10000.0)
    return float(theta)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def gguf_rows(weight, heads: int):
    """Reorder a q/k projection (out, in) from HF's rotate_half layout to GGML's pairs."""
    out, rest = weight.shape[0], weight.shape[1:]
    return weight.reshape(heads, 2, out // heads // 2, *rest).transpose(1, 2).reshape(weight.shape)


def hf_rows(weight, heads: int):
    """The inverse of ``gguf_rows``."""
    out, rest = weight.shape[0], weight.shape[1:]
    return weight.reshape(heads, out // heads // 2, 2, *rest).transpose(1, 2).reshape(weight.shape)


def llama3_rope_factors(config) -> list[float] | None:
    """Per-frequency divisors of Llama 3.x's rope scaling (llama.cpp reads them from the
    ``rope_freqs`` tensor): long wavelengths are stretched by ``factor``, short ones kept, and
    the band between is blended smoothly."""
    scaling = _rope_scaling(config)
    if not scaling or scaling.get("rope_type", scaling.get("type")) != "llama3":
        return None
    dim, theta = _head_dim(config), _rope_theta(config)
    factor = scaling.get("factor", 8.0)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    context = scaling.get("original_max_position_embeddings", 8192)
    factors = []
    for i in range(0, dim, 2):
        wavelength = 2 * math.pi * theta ** (i / dim)
        if wavelength < context / high:
            factors.append(1.0)
        elif wavelength > context / low:
            factors.append(float(factor))
        else:
            blend = (context / wavelength - low) / (high - low)
            factors.append(1.0 / ((1 - blend) / factor + blend))
    return factors


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer",
                                                                        None)
    if backend is None:
        raise FastloraError("GGUF export needs a fast (tokenizer.json) tokenizer.",
                            "Export without --gguf and convert with llama.cpp's "
                            "convert_hf_to_gguf.py.")
    return json.loads(backend.to_str())


def _pre_tokenizer_name(spec: dict) -> str | None:
    """llama.cpp's name for the pre-tokenizer, for the two byte-level kinds we can recognise."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"  # llama.cpp's name for GPT-2's split regex
    if kinds and kinds[0] == "Split" and kinds[-1] == "ByteLevel":
        pattern = (parts[0].get("pattern") or {}).get("Regex", "")
        if pattern.startswith("(?i:'s|'t|'re|'ve|'m|'ll|'d)") and "\\p{N}{1,3}" in pattern:
            return "llama-bpe"
    return None


def _vocabulary(tokenizer, gguf):
    """(tokens, token types, merges, tokenizer model name, pre-tokenizer name, notes)."""
    spec = _tokenizer_json(tokenizer)
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise FastloraError(
            "GGUF export handles byte-level BPE tokenizers (Llama 3, this package's default); "
            "this tokenizer is a SentencePiece-style one (Llama 2, Mistral v0.1).",
            "Export without --gguf and convert the merged folder with llama.cpp's "
            "convert_hf_to_gguf.py.")
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else \
            gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    pre = _pre_tokenizer_name(spec)
    notes = [] if pre else ["the pre-tokenizer was not recognised, so tokenizer.ggml.pre is not "
                            "set: llama.cpp uses its default splitting (check tokenization)"]
    return tokens, types, merges, "gpt2", pre, notes


def write_gguf(model, tokenizer, path, kind: str = "f16") -> dict:
    """Write ``model`` (a merged Llama-architecture ``*ForCausalLM``) to ``path`` as GGUF.
    ``kind``: ``f16``, ``bf16`` or ``f32`` for the matrices (norms and rope factors stay f32)."""
    import gguf
    import numpy as np
    import torch

    config = model.config
    check_gguf_support(config)
    qtypes = {"f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
              "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
              "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16)}
    if kind not in qtypes:
        raise FastloraError(f"Unknown GGUF tensor type {kind!r}.", "Use f16, bf16 or f32.")
    qtype, file_type = qtypes[kind]
    arch = GGUF_ARCHS[config.model_type]
    tokens, types, merges, tok_model, pre, notes = _vocabulary(tokenizer, gguf)
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), arch)
    name = getattr(config, "name_or_path", "") or "model"
    writer.add_name(pathlib.Path(str(name)).name or "model")
    writer.add_file_type(file_type)
    writer.add_vocab_size(len(tokens))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    head_dim = _head_dim(config)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(config.num_attention_heads)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    writer.add_head_count_kv(kv_heads)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    scaling = _rope_scaling(config)
    if scaling and scaling.get("rope_type", scaling.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    writer.add_tokenizer_model(tok_model)
    if pre:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (("bos_token_id", writer.add_bos_token_id),
                     ("eos_token_id", writer.add_eos_token_id),
                     ("pad_token_id", writer.add_pad_token_id),
                     ("unk_token_id", writer.add_unk_token_id)):
        value = getattr(tokenizer, key, None)
        if value is not None:
            add(int(value))
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    count = 0
    factors = llama3_rope_factors(config)
    if factors is not None:
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                          np.asarray(factors, dtype=np.float32))
        count += 1
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd.weight when output.weight is absent
        target = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if target is None:
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue
            raise FastloraError(f"GGUF export found a tensor it cannot name: {hf_name}.",
                                "Export without --gguf and convert with llama.cpp's "
                                "convert_hf_to_gguf.py.")
        weight = tensor.detach().to(torch.float32)
        if hf_name.endswith("q_proj.weight"):
            weight = gguf_rows(weight, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            weight = gguf_rows(weight, kv_heads)
        data = weight.cpu().numpy()
        if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(target, data)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(target, data.astype(np.float16))
        else:
            writer.add_tensor(target, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        count += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return {"tensors": count, "architecture": arch, "tokenizer": tok_model, "pre": pre,
            "notes": notes}
