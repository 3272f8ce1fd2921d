"""The order patterns run in: the stage list of src/fastlora/stages.py."""
import pytest
import torch

import fastlora
from fastlora import builtin_patterns
from fastlora.pattern import Pattern
from fastlora.stages import STAGES, run_order


def _identity(x: torch.Tensor):
    return x


def test_every_builtin_pattern_is_listed_in_exactly_one_stage():
    listed = [name for stage in STAGES for name in stage.patterns]
    assert sorted(listed) == builtin_patterns.names()
    assert len(set(listed)) == len(listed)


def test_builtins_run_in_the_listed_order():
    builtins = [p.name for p in fastlora.registered_patterns() if p.builtin]
    assert builtins == [name for stage in STAGES for name in stage.patterns]


def test_user_patterns_run_after_the_builtins_of_their_stage_in_registration_order():
    def make(name, stage=None):
        return Pattern(name=name, spellings=[_identity], replacement=_identity, stage=stage)

    builtin = [Pattern(name=n, spellings=[_identity], replacement=_identity, builtin=True)
               for n in ("rms_norm_lora_qkv", "swiglu", "lora_linear", "lora_mlp")]
    mine = [make("late", "fused"), make("early", "adapters"), make("plain"), make("plain2", "ops")]
    order = [p.name for p in run_order(mine[:2] + builtin + mine[2:])]
    assert order == ["lora_mlp", "lora_linear", "early", "swiglu", "plain", "plain2",
                     "rms_norm_lora_qkv", "late"]


def test_a_builtin_pattern_takes_its_listed_stage():
    p = Pattern(name="lora_linear", spellings=[_identity], replacement=_identity, builtin=True)
    assert p.stage == "adapters"
    with pytest.raises(ValueError, match="lists it in stage 'adapters'"):
        Pattern(name="lora_linear", spellings=[_identity], replacement=_identity, builtin=True,
                stage="fused")


def test_unknown_stage_and_old_priority_are_refused():
    with pytest.raises(ValueError, match="stage must be one of"):
        Pattern(name="mine", spellings=[_identity], replacement=_identity, stage="late")
    with pytest.raises(TypeError, match="replaced by `stage`"):
        fastlora.register_pattern(name="mine", spellings=[_identity], replacement=_identity,
                                  priority=3)
    assert "mine" not in {p.name for p in fastlora.registered_patterns()}
