"""Spelling variants generated from their axes (fastlora.pattern.spelling_variants)."""
import torch

from fastlora.canonicalize import canonicalize
from fastlora.matcher import attempts_at, trace_spelling
from fastlora.pattern import spelling_variants
from fx_graphs import graph_of, node_calling


def make(dropout: bool, final_cast: bool):
    def spelling(x: torch.Tensor, w: torch.Tensor, p: float, training: bool):
        h = torch.nn.functional.dropout(x, p, training, False) if dropout else x
        y = torch.sin(h) * w
        return y.to(w.dtype) if final_cast else y
    return spelling


def _name(dropout, final_cast):
    return "sin" + "_dropout" * dropout + "_autocast" * (not final_cast)


def test_every_combination_named_with_the_first_axis_fastest():
    variants = spelling_variants(make, _name, dropout=(False, True), final_cast=(True, False))
    assert [v.__name__ for v in variants] == ["sin", "sin_dropout", "sin_autocast",
                                              "sin_dropout_autocast"]
    assert [trace_spelling(v).name for v in variants] == [v.__name__ for v in variants]


def test_a_parameter_a_variant_does_not_read_is_never_bound():
    plain = spelling_variants(make, _name, dropout=(False,), final_cast=(True,))[0]
    gm = graph_of(lambda x, w: torch.sin(x) * w, torch.randn(3), torch.randn(3))
    canonicalize(gm.graph)
    (attempt,) = attempts_at(trace_spelling(plain), node_calling(gm.graph, torch.mul), set())
    assert attempt.reason is None
    assert sorted(attempt.state.bindings) == ["w", "x"]


def test_builtin_spelling_names_are_those_the_reports_show():
    from fastlora.patterns import attention, lora_grouped, lora_linear, qlora

    def names(spellings):
        return [s.__name__ for s in spellings]

    assert names(lora_linear.SPELLINGS) == [
        "peft_lora", "peft_lora_dropout", "peft_lora_autocast", "peft_lora_dropout_autocast",
        "adapter_on_base", "adapter_on_base_dropout", "adapter_on_base_uncast",
        "adapter_on_base_dropout_uncast", "adapter_cast_then_add", "adapter_cast_then_add_dropout"]
    assert names(lora_grouped.MLP_SPELLINGS) == [
        f"{act}_lora{suffix}" for act in ("swiglu", "geglu")
        for suffix in ("", "_dropout", "_autocast", "_dropout_autocast")]
    assert names(lora_grouped.QKV_SPELLINGS) == [
        "qkv_lora", "qkv_lora_dropout", "qkv_lora_autocast", "qkv_lora_dropout_autocast"]
    assert names(qlora.SPELLINGS) == [
        "peft_bnb_4bit", "peft_bnb_4bit_dropout", "peft_bnb_4bit_autocast",
        "peft_bnb_4bit_dropout_autocast", "adapter_on_base", "adapter_on_base_dropout"]
    assert names([attention.sdpa] + attention.EAGER) == [
        "sdpa", "eager_softcap_masked", "eager_masked", "eager_softcap", "eager"]
