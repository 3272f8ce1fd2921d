"""The embedded default of ``fastlora train``: a small Llama model, a tokenizer and a dataset,
all shipped in ``fastlora/app/data/`` so the main job runs offline with no argument at all.

- ``default_model.json``: a ``LlamaConfig`` (4 layers, hidden 192, GQA 6/2 heads). The weights are
  random, drawn from a fixed seed; ``fastlora train`` saves them beside the adapter so the adapter
  can be merged and exported later.
- ``tokenizer.json``: a byte-level BPE (512 tokens) trained on the dataset below with the
  ``tokenizers`` library, plus a chat template (``tokenizer_config.json``). Any UTF-8 text encodes.
- ``default_dataset.jsonl``: 480 instruction/response pairs in TRL's conversational
  prompt/completion format, on six templated tasks a small model visibly learns (arithmetic,
  reversing words, dates, unit conversion, sorting, upper case). Generated deterministically.

Regenerate the files with ``python -m fastlora.app.embedded`` (the output is byte-identical).
"""
from __future__ import annotations

import datetime
import json
import pathlib
import random

DATA = pathlib.Path(__file__).resolve().parent / "data"
MODEL_CONFIG = DATA / "default_model.json"
TOKENIZER_FILE = DATA / "tokenizer.json"
TOKENIZER_CONFIG = DATA / "tokenizer_config.json"
DATASET = DATA / "default_dataset.jsonl"
DEFAULT_NAME = "fastlora-tiny-llama"
INIT_SEED = 1234  # the default model's weights depend on this seed only, never on --seed

SPECIALS = {"bos": "<s>", "eos": "</s>", "pad": "<pad>"}
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


# ----------------------------------------------------------------------------- the dataset
_WORDS = ("river stone apple window garden silver morning candle paper forest bridge cloud "
          "orange winter summer tiger lemon rocket pencil island coffee mirror thunder castle "
          "violin planet meadow harbor lantern falcon ocean desert maple copper velvet").split()
_MONTHS = ("January February March April May June July August September October November "
           "December").split()
_UNITS = [  # (from, to, factor, plural from, plural to)
    ("kilometer", "meter", 1000, "kilometers", "meters"),
    ("meter", "centimeter", 100, "meters", "centimeters"),
    ("kilogram", "gram", 1000, "kilograms", "grams"),
    ("hour", "minute", 60, "hours", "minutes"),
    ("minute", "second", 60, "minutes", "seconds"),
    ("liter", "milliliter", 1000, "liters", "milliliters"),
    ("day", "hour", 24, "days", "hours"),
    ("week", "day", 7, "weeks", "days"),
]


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice("+-")
    if op == "-" and b > a:
        a, b = b, a
    value = a + b if op == "+" else a - b
    ask = rng.choice(["What is {a} {op} {b}?", "Compute {a} {op} {b}.",
                      "Please calculate {a} {op} {b}."]).format(a=a, op=op, b=b)
    return ask, f"{a} {op} {b} = {value}"


def _reverse(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, rng.randint(3, 5))
    ask = rng.choice(["Reverse the order of these words: {w}",
                      "Write these words in reverse order: {w}"]).format(w=" ".join(words))
    return ask, " ".join(reversed(words))


def _date(rng: random.Random) -> tuple[str, str]:
    day = datetime.date(2000, 1, 1) + datetime.timedelta(days=rng.randint(0, 365 * 30))
    ask = rng.choice(["Convert the date {d} to words.",
                      "Write the date {d} in long form."]).format(d=day.isoformat())
    return ask, f"{_MONTHS[day.month - 1]} {day.day}, {day.year}"


def _units(rng: random.Random) -> tuple[str, str]:
    one, other, factor, ones, others = rng.choice(_UNITS)
    n = rng.randint(1, 12)
    ask = rng.choice(["How many {to} are in {n} {frm}?",
                      "Convert {n} {frm} to {to}."]).format(
        n=n, frm=one if n == 1 else ones, to=others)
    return ask, f"{n} {one if n == 1 else ones} is {n * factor} {others}."


def _sort(rng: random.Random) -> tuple[str, str]:
    numbers = rng.sample(range(1, 100), rng.randint(4, 6))
    ask = rng.choice(["Sort these numbers from smallest to largest: {x}",
                      "Put these numbers in ascending order: {x}"]).format(
        x=", ".join(map(str, numbers)))
    return ask, ", ".join(map(str, sorted(numbers)))


def _upper(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, rng.randint(2, 3))
    ask = rng.choice(["Write in capital letters: {w}",
                      "Convert to upper case: {w}"]).format(w=" ".join(words))
    return ask, " ".join(words).upper()


TASKS = (_arithmetic, _reverse, _date, _units, _sort, _upper)


def dataset_rows(n: int = 480, seed: int = 0) -> list[dict]:
    """``n`` rows in TRL's conversational prompt/completion format, tasks interleaved."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        ask, answer = TASKS[i % len(TASKS)](rng)
        rows.append({"prompt": [{"role": "user", "content": ask}],
                     "completion": [{"role": "assistant", "content": answer}]})
    return rows


# ----------------------------------------------------------------------------- the tokenizer
def build_tokenizer_json(rows: list[dict], vocab_size: int = 512) -> str:
    """Train the byte-level BPE on the dataset's text; returns tokenizer.json's contents."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [SPECIALS["bos"], SPECIALS["eos"], SPECIALS["pad"], *ROLE_TOKENS]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    text = [m["content"] for r in rows for m in r["prompt"] + r["completion"]]
    tok.train_from_iterator(text, trainer=trainer)
    return tok.to_str(pretty=True)


def tokenizer_config() -> dict:
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIALS["bos"],
            "eos_token": SPECIALS["eos"], "pad_token": SPECIALS["pad"],
            "additional_special_tokens": ROLE_TOKENS, "chat_template": CHAT_TEMPLATE,
            "model_max_length": 512, "clean_up_tokenization_spaces": False}


def load_tokenizer():
    """The shipped tokenizer as a ``PreTrainedTokenizerFast`` (no hub access)."""
    from transformers import PreTrainedTokenizerFast

    cfg = json.loads(TOKENIZER_CONFIG.read_text())
    cfg.pop("tokenizer_class")
    return PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_FILE), **cfg)


# ----------------------------------------------------------------------------- the model
def model_config_dict() -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 512,
            "hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 4,
            "num_attention_heads": 6, "num_key_value_heads": 2, "max_position_embeddings": 512,
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
            "hidden_act": "silu", "initializer_range": 0.1, "bos_token_id": 0,
            "eos_token_id": 1, "pad_token_id": 2}


def build_model():
    """The default LlamaForCausalLM with weights drawn from ``INIT_SEED`` (fp32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads(MODEL_CONFIG.read_text())
    cfg.pop("model_type", None)
    config = LlamaConfig(**cfg)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(INIT_SEED)
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    model.config.name_or_path = DEFAULT_NAME
    return model


def write_files(folder: pathlib.Path = DATA) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = dataset_rows()
    with open(folder / DATASET.name, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    (folder / TOKENIZER_FILE.name).write_text(build_tokenizer_json(rows))
    (folder / TOKENIZER_CONFIG.name).write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    (folder / MODEL_CONFIG.name).write_text(json.dumps(model_config_dict(), indent=2) + "\n")


if __name__ == "__main__":
    write_files()
    print(f"wrote {DATASET.name}, {TOKENIZER_FILE.name}, {TOKENIZER_CONFIG.name}, "
          f"{MODEL_CONFIG.name} in {DATA}")
