"""compile_for_trainer(remove_padding=True) (unpad.py): padded batches packed into one row before
the compiled call. Loss and every LoRA gradient equal eager's padded step (right and left
padding, three widths in one compile, num_items_in_batch), the packed path's fusions in the
report, logits back in the padded layout, and every call that cannot be proven exact left
padded: noted, logged once, still eager's."""
import copy
import types

import pytest
import torch

import fastlora
from fastlora import unpad
from fastlora.options import OptionsError
from helpers import rel_err, run_step, tiny_llama, with_lora
from test_attention_pattern import SMALL, tiny_gemma2, tiny_mistral

OPTIONS = {"compiler": "aot_eager", "strict": True, "remove_padding": True}
WIDTHS = (12, 9, 15)  # one step each: the width changes every step


def tiny(family, **kw):
    import transformers as T
    config, model = {"qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
                     "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM),
                     "gemma": (T.GemmaConfig, T.GemmaForCausalLM)}[family]
    return model(config(num_hidden_layers=1, **SMALL, **kw))


# every family of unpad.FAMILIES; windows shorter than the rows; attention masks of the layers
MODELS = {"llama": (lambda: tiny_llama(layers=2), ["causal+documents"] * 2),
          "qwen2": (lambda: tiny("qwen2"), ["causal+documents"]),
          "qwen3": (lambda: tiny("qwen3", head_dim=10), ["causal+documents"]),
          "gemma": (lambda: tiny("gemma", head_dim=10), ["causal+documents"]),
          "mistral": (lambda: tiny_mistral(window=4, layers=1), ["causal+window+documents"]),
          "gemma2": (tiny_gemma2, ["causal+window+documents", "causal+documents"])}


def padded(side, width, lengths, prompt=0, labels_on_pads=False, gen=None):
    """A collator's batch: rows of ``lengths`` tokens padded to ``width`` on ``side``; labels
    are the ids with -100 on the pads (unless ``labels_on_pads``) and on each row's first
    ``prompt`` tokens (a completion-only loss)."""
    ids = torch.randint(0, 97, (len(lengths), width), generator=gen)
    mask = torch.zeros_like(ids)
    labels = ids.clone()
    for r, n in enumerate(lengths):
        start = 0 if side == "right" else width - n
        mask[r, start:start + n] = 1
        labels[r, start:start + prompt] = -100
    if not labels_on_pads:
        labels = labels.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _lengths(width, gen):
    return [width] + torch.randint(2, width, (2,), generator=gen).tolist()


def exact(eager, compiled, inputs, tol=1e-5):
    loss_e, grads_e = run_step(eager, inputs)
    loss_c, grads_c = run_step(compiled, inputs)
    assert set(grads_c) == set(grads_e) and grads_e
    errs = {n: rel_err(grads_c[n], g) for n, g in grads_e.items()}
    assert rel_err(loss_c, loss_e) < tol and max(errs.values()) < tol, (loss_c, loss_e, errs)


def pair(make, **options):
    eager = with_lora(make())
    compiled = copy.deepcopy(eager)
    fastlora.clear_reports()
    fastlora.compile_for_trainer(compiled, **{**OPTIONS, **options})
    return eager, compiled


# ---------------------------------------------------------------- exact, one compile


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", list(MODELS))
def test_packed_steps_equal_eager_padded_steps(family, side):
    """Three steps of three widths: every step's loss and LoRA gradients are eager's padded
    ones, one graph serves all widths, and it has the padding-free path's fusions (documents
    in attention, the fused loss). Left padding with -100 on each row's first two tokens (a
    completion-only loss; with a target there eager predicts it from a pad, see below)."""
    make, masks = MODELS[family]
    eager, compiled = pair(make)
    gen = torch.Generator().manual_seed(1)
    for width in WIDTHS:
        inputs = padded(side, width, _lengths(width, gen), prompt=2 if side == "left" else 0,
                        gen=gen)
        if side == "right":  # as the Trainer passes it at every step (gradient accumulation):
            # the labelled tokens of every micro-batch; left padding has the mean over targets
            inputs["num_items_in_batch"] = torch.tensor(int((inputs["labels"] != -100).sum()) + 7)
        exact(eager, compiled, inputs)
    assert unpad.stats(compiled) == {"packed": 3, "padded": {}}
    reports = fastlora.reports(compiled)
    assert len(reports) == 1, [r.counts() for r in reports]
    assert unpad.PACKED_NOTE in reports[0].notes
    counts = reports[0].counts()
    assert counts.get("linear_cross_entropy") == 1, counts
    attention = [m["params"] for m in reports[0].matches if m["pattern"] == "attention"]
    assert [(p["kernel"], p["mask"]) for p in attention] == [("triton", m) for m in masks]


def test_logits_come_back_padded_with_zeros_on_pads():
    """return_logits=True: [B, S, V] logits, eager's at the tokens, 0 at the pads. By default
    (the loss fused, logits dropped) the NaN stand-in keeps the padded shape, no memory."""
    eager, compiled = pair(lambda: tiny_llama(layers=1), return_logits=True)
    for side in ("right", "left"):
        inputs = padded(side, 10, [10, 4, 7], prompt=1)
        mask = inputs["attention_mask"].bool()
        out_e, out_c = eager(**inputs), compiled(**inputs)
        assert out_c.logits.shape == out_e.logits.shape
        assert rel_err(out_c.logits[mask], out_e.logits[mask]) < 1e-5
        assert (out_c.logits[~mask] == 0).all()
        assert out_c.past_key_values is None
        assert rel_err(out_c.loss, out_e.loss) < 1e-5
    assert unpad.stats(compiled) == {"packed": 2, "padded": {}}
    _, dropped = pair(lambda: tiny_llama(layers=1))
    logits = dropped(**padded("right", 10, [10, 4, 7])).logits
    assert logits.shape == (3, 10, 97) and torch.isnan(logits).all()
    assert all(s == 0 for s in logits.stride())


def _model_stub(model_type="llama", attn="sdpa", config=None, cls="StubForCausalLM"):
    """What ``plan`` reads of a model: its class name and config."""
    config = config or types.SimpleNamespace(model_type=model_type, _attn_implementation=attn)
    return type(cls, (), {"config": config})()


def test_shifted_outputs_come_back_in_eager_layout():
    """TRL's fused_lm_head fields are [1, T - 1] on the packed row (k predicts k + 1): they come
    back as [B, S - 1] with each eager position's value and zeros where eager has no target."""
    inputs = padded("left", 6, [6, 3, 4], prompt=1)
    model = _model_stub(config=tiny_llama(layers=1).config)
    packed = unpad.plan(model, (), inputs)
    assert isinstance(packed, unpad.Packed)
    ids = packed.kwargs["input_ids"][0]
    T = ids.numel()
    out = {"loss": torch.tensor(1.0), "next_id": ids[1:][None].float(),
           "label_mask": (packed.kwargs["labels"][0, 1:] != -100)[None]}
    back = packed.repad(out)
    mask = inputs["attention_mask"].bool()
    both = mask[:, 1:] & mask[:, :-1]  # eager position (r, c) predicts (r, c + 1) from a token
    want = torch.where(both, inputs["input_ids"][:, 1:].float(), 0.0)
    assert back["next_id"].shape == (3, 5) and torch.equal(back["next_id"], want)
    assert torch.equal(back["label_mask"], inputs["labels"][:, 1:] != -100)
    assert back["loss"] == 1.0 and T == 13


def test_plan_positions_and_labels_left_padding():
    """What eager uses without position ids (arange(S) in every row, left padding too),
    gathered at the tokens; each row's first label is -100."""
    inputs = padded("left", 5, [5, 2], prompt=0)
    inputs["labels"][1, 3] = -100  # left padding: the first token of a padded row is no target
    model = _model_stub(config=tiny_llama(layers=1).config)
    packed = unpad.plan(model, (), inputs)
    assert packed.kwargs["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4]]
    labels = packed.kwargs["labels"][0].tolist()
    assert labels[0] == -100 and labels[5] == -100 and labels[6] == inputs["labels"][1, 4]
    assert "attention_mask" not in packed.kwargs and packed.kwargs["use_cache"] is False


# ---------------------------------------------------------------- left padded, with reasons


def _refusal(inputs, args=(), model=None):
    why = unpad.plan(model or _model_stub(), args, inputs)
    assert isinstance(why, str), why
    return why


def test_calls_left_padded_and_why():
    base = padded("right", 6, [6, 3])
    holes = padded("right", 6, [6, 6])
    holes["attention_mask"][1, 2] = 0
    holes["labels"][1, 2] = -100
    joined = padded("right", 6, [3, 3])  # row 1's tokens at columns 3-5: positions 3, 4, 5
    joined["attention_mask"] = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]])
    joined["labels"] = joined["labels"].masked_fill(joined["attention_mask"] == 0, -100)
    cases = {
        "argument inputs_embeds": {**base, "inputs_embeds": torch.zeros(2, 6, 40)},
        "argument use_cache=True": {**base, "use_cache": True},
        "argument past_key_values": {**base, "past_key_values": object()},
        "argument return_dict=False": {**base, "return_dict": False},
        "argument output_hidden_states=True": {**base, "output_hidden_states": True},
        "argument token_type_ids": {**base, "token_type_ids": torch.zeros(2, 6)},
        "attention_mask of shape (2, 1, 6, 6)": {**base, "attention_mask": torch.ones(2, 1, 6, 6)},
        "values other than 0 and 1": {**base, "attention_mask": base["attention_mask"] * 2},
        "holes in the mask": holes,
        "position ids that do not step by 1": joined,
        "position ids that do not step": {**base, "position_ids": torch.tensor([[0, 1, 2, 4, 5,
                                                                                  6]] * 2)},
        "a label on a pad": padded("right", 6, [6, 3], labels_on_pads=True),
        "first token is a target": padded("left", 6, [6, 3]),
        "no token in the batch": {**base, "attention_mask": torch.zeros(2, 6, dtype=torch.long)},
    }
    for expected, inputs in cases.items():
        assert expected in _refusal(inputs), (expected, _refusal(inputs))
    assert "positional arguments" in _refusal({"attention_mask": base["attention_mask"]},
                                              args=(base["input_ids"],))
    assert "model family 'mixtral'" in _refusal(base, model=_model_stub("mixtral"))
    assert "flash_attention_2" in _refusal(base, model=_model_stub(attn="flash_attention_2"))
    assert "LlamaForSequenceClassification is not a causal LM" in _refusal(
        base, model=_model_stub(cls="LlamaForSequenceClassification"))
    assert unpad.plan(_model_stub(), (), {"input_ids": base["input_ids"]}) is None  # no mask
    assert isinstance(unpad.plan(_model_stub(), (), {**base, "use_cache": False,
                                                     "position_ids": None}), unpad.Packed)


@pytest.mark.parametrize("case", ["labels_on_pads", "left_first_token_target"])
def test_refused_batches_run_padded_noted_and_exact(case, warnings_logged):
    """A batch eager trains differently from its packed form runs padded, as given: eager's
    loss and gradients, a note in the report of the graph it compiles, one warning however many
    calls; a provable batch afterwards is packed (a graph of its own)."""
    eager, compiled = pair(lambda: tiny_llama(layers=1))
    side = "right" if case == "labels_on_pads" else "left"
    for width in (8, 8):
        exact(eager, compiled, padded(side, width, [width, 5], labels_on_pads=side == "right"))
    reason = "a label on a pad" if side == "right" else "first token is a target"
    stats = unpad.stats(compiled)
    assert stats["packed"] == 0 and list(stats["padded"].values()) == [2]
    assert reason in next(iter(stats["padded"]))
    assert [line for line in warnings_logged if reason in line] == warnings_logged
    assert len(warnings_logged) == 1
    notes = fastlora.reports(compiled)[0].notes
    assert any(reason in n and "runs padded batches as given" in n for n in notes), notes
    exact(eager, compiled, padded("right", 8, [8, 5]))
    assert unpad.stats(compiled)["packed"] == 1
    assert unpad.PACKED_NOTE in fastlora.reports(compiled)[-1].notes


def test_option_is_checked_and_off_by_default():
    with pytest.raises(OptionsError, match="remove_padding"):
        fastlora.compile_for_trainer(with_lora(tiny_llama(layers=1)), remove_padding="yes")
    model = with_lora(tiny_llama(layers=1))
    fastlora.compile_for_trainer(model, compiler="aot_eager")
    assert unpad.stats(model) == {"packed": 0, "padded": {}}
    model(**padded("right", 6, [6, 3]))
    assert unpad.stats(model) == {"packed": 0, "padded": {}}  # the option is off: not wrapped


def test_sft_trainer_padded_batches_packed_and_exact(tmp_path, monkeypatch):
    """SFTTrainer's own padded batches (right padding, -100 on the pads) through TRL's fused LM
    head (its per-token fields come back as [B, S - 1]): eager's losses and adapter weights,
    every step packed, one compile of the model. The fused ops run their CPU reference kernels,
    as in tests/test_trl.py (this is about the trainer's batches and the packing; the Triton
    kernels on packed rows are checked under the interpreter by the tests above)."""
    pytest.importorskip("trl")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from test_trl import _model, _rows, _run
    eager = _model()
    compiled = copy.deepcopy(eager)
    rows = _rows(24)
    losses_e, weights_e = _run(eager, tmp_path / "e", rows, steps=3, pad=None)
    fastlora.clear_reports()
    fastlora.compile_for_trainer(compiled, **OPTIONS)
    losses_c, weights_c = _run(compiled, tmp_path / "c", rows, steps=3, pad=None)
    assert max(rel_err(torch.tensor(c), torch.tensor(e))
               for c, e in zip(losses_c, losses_e)) < 1e-5, (losses_c, losses_e)
    errors = {n: rel_err(weights_c[n], w) for n, w in weights_e.items()}
    assert max(errors.values()) < 1e-5, errors
    assert unpad.stats(compiled) == {"packed": 3, "padded": {}}
    assert len(fastlora.reports(compiled)) == 1
