"""Loading what ``fastlora train`` fine-tunes: the device and dtype, the base model (a folder, a hub
id, or the embedded default; optionally 4-bit through bitsandbytes) with its tokenizer, and the
LoRA adapter. Every input problem becomes a ``FastloraError`` saying what to do."""
from __future__ import annotations

import pathlib
import tempfile

from . import embedded
from .errors import FastloraError


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(cfg, device: str):
    import torch

    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if cfg.dtype != "auto":
        if cfg.dtype not in names:
            raise FastloraError(f"Unknown --dtype {cfg.dtype!r}.", "Use auto, bf16, fp16 or fp32.")
        return names[cfg.dtype]
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _check_model_path(name: str) -> str:
    path = pathlib.Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FastloraError(f"The model path {name} is a file.",
                                "Pass the folder that holds the model's config.json.")
        if not (path / "config.json").exists():
            raise FastloraError(f"The model folder {name} has no config.json, so it is not a "
                                "Hugging Face model folder.",
                                "Pass the folder that save_pretrained wrote, or a hub id.")
        return str(path)
    looks_like_hub_id = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise FastloraError(f"The model path {name} does not exist.",
                            "Pass a model folder or a Hugging Face hub id (owner/name) with "
                            "--model, or leave --model out to use the embedded default model.")
    return name


def _load_config(name: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name)
    except OSError as e:
        raise FastloraError(
            f"Could not find the model {name!r}: there is no folder of that name, and loading "
            f"it from the Hugging Face Hub failed ({_first_line(e)}).",
            "Check the spelling, download it first (huggingface-cli download), or pass a local "
            "folder.") from e
    except ValueError as e:
        raise FastloraError(f"The model {name!r} has a config transformers cannot read "
                            f"({_first_line(e)}).",
                            "Upgrade transformers, or pass a supported model.") from e


# Families transformers can load as causal LMs that are encoders or halves of encoder-decoders:
# a user passing one (bert-base-uncased) made a mistake, and SFT on it would be meaningless.
_NOT_DECODER_ONLY = {
    "bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "electra", "camembert", "ernie",
    "data2vec-text", "bert-generation", "megatron-bert", "rembert", "roc_bert", "xmod",
    "big_bird", "bart", "mbart", "marian", "pegasus", "blenderbot", "blenderbot-small", "plbart",
    "prophetnet", "xlm-prophetnet", "trocr"}


def _check_causal_lm(config, name: str) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    fix = "Pass a decoder-only language model such as Llama, Mistral, Qwen2/3, Gemma or Phi-3."
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or \
            getattr(config, "is_encoder_decoder", False):
        raise FastloraError(f"The model {name!r} is of type {model_type!r}, which is not a "
                            f"causal language model, so it cannot be fine-tuned with SFT.", fix)
    if model_type in _NOT_DECODER_ONLY:
        raise FastloraError(f"The model {name!r} is of type {model_type!r}, an encoder (or one "
                            f"half of an encoder-decoder), not a decoder-only causal language "
                            f"model, so SFT would not make a model that generates.", fix)


def _quantization_config(cfg, dtype):
    if not cfg.load_in_4bit:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:
        raise FastloraError(
            f"--load-in-4bit needs bitsandbytes, which could not be imported "
            f"({_first_line(e)}).",
            "Install it with pip install 'fastlora[qlora]' (bitsandbytes), or train without "
            "--load-in-4bit.") from e
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)


def load_model_and_tokenizer(cfg, device: str, dtype, base_dir: pathlib.Path | None):
    """The base model (on ``device``: "cuda" is the current GPU) and its tokenizer. The embedded
    default model is saved to ``base_dir`` first, so the adapter can be merged and exported
    later (``None``: not saved, as on the processes of a multi-GPU run but the main one)."""
    from transformers import AutoTokenizer

    quant = _quantization_config(cfg, dtype)
    if cfg.model is None:
        tokenizer = embedded.load_tokenizer()
        model = embedded.build_model()
        if base_dir is not None:
            model.save_pretrained(base_dir)
            tokenizer.save_pretrained(base_dir)
        base = None if base_dir is None else str(base_dir)
        if quant is None:
            return model.to(device=device, dtype=dtype), tokenizer, base
        if base_dir is None:  # bitsandbytes quantizes while loading from a folder
            with tempfile.TemporaryDirectory(prefix="fastlora-base-") as tmp:
                model.save_pretrained(tmp)
                return _from_pretrained(tmp, None, device, dtype, quant), tokenizer, None
        return _from_pretrained(base, None, device, dtype, quant), tokenizer, base
    source = _check_model_path(cfg.model)
    config = _load_config(source)
    _check_causal_lm(config, cfg.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as e:
        raise FastloraError(f"Could not load the tokenizer of {cfg.model!r} "
                            f"({_first_line(e)}).",
                            "The model folder needs its tokenizer files "
                            "(tokenizer.json or tokenizer.model).") from e
    return _from_pretrained(source, cfg.model, device, dtype, quant), tokenizer, source


def _from_pretrained(source: str, name: str | None, device: str, dtype, quant):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype}
    if quant is not None:
        where = torch.cuda.current_device() if device == "cuda" else "cpu"
        kwargs.update(quantization_config=quant, device_map={"": where})
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise FastloraError(f"Could not load the model {name or source!r} "
                            f"({_first_line(e)}).",
                            "Check that the folder holds the weights (model.safetensors).") from e
    return model if quant is not None else model.to(device)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__).rstrip(".")


def _linear_names(model) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if type(m).__name__ in ("Linear", "Linear4bit", "Linear8bitLt")} - {"lm_head"})


def add_lora(model, cfg):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    targets = cfg.lora_targets
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
        names = {n for n, _ in model.named_modules()}
        # peft only complains when no name matches; a misspelt one among several would be
        # silently dropped, so every name must match a module here.
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if missing or not targets:
            raise FastloraError(
                f"--lora-targets names {', '.join(missing) or 'no module'}, which "
                f"{'is' if len(missing) == 1 else 'are'} not in this model.",
                f"Use module names of this model, comma-separated (its linear layers: "
                f"{', '.join(_linear_names(model))}), or all-linear.")
    if cfg.load_in_4bit:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_r,
                      lora_dropout=cfg.lora_dropout, target_modules=targets,
                      task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as e:
        raise FastloraError(f"LoRA could not be applied: {_first_line(e)}.",
                            f"--lora-targets takes module names of this model, comma-separated "
                            f"(its linear layers: {', '.join(_linear_names(model))}), or "
                            f"all-linear.") from e
