"""The launch-configuration registry, fastlora.kernels.tuning: entries registered by the kernel
files, overrides that hold where they are set and nowhere else, refusals of unknown names."""
import pytest

from fastlora.kernels import rms_norm, rope, tuning


def test_every_op_file_registers_its_entry():
    assert {"rms_norm", "layer_norm", "rope", "glu", "linear_cross_entropy", "flash_attention",
            "lora_dot", "lora_down", "lora_up", "lora_grad_down", "lora_grad_b", "lora_grad_x",
            "lora_glu_fwd", "lora_glu_bwd"} <= set(tuning.entries())
    assert tuning.get("rope") == {"tile": rope.DEFAULT_TILE}


def test_override_holds_inside_the_block_and_nests():
    before = rms_norm.tile_config(4096, 2, "fwd")
    with tuning.override("rms_norm", tile=(4, 2)):
        assert rms_norm.tile_config(4096, 2, "fwd") == (4, 4096, 2)  # the launcher reads it
        with tuning.override("rms_norm", tile=(8, 4)):
            assert tuning.get("rms_norm")["tile"] == (8, 4)
        assert tuning.get("rms_norm")["tile"] == (4, 2)
    assert rms_norm.tile_config(4096, 2, "fwd") == before


def test_override_restores_after_an_exception():
    with pytest.raises(RuntimeError):
        with tuning.override("lora_down", block_m=32):
            raise RuntimeError
    assert tuning.get("lora_down") == tuning.defaults("lora_down")


def test_set_and_reset_change_only_the_named_keys():
    try:
        tuning.set("lora_grad_x", block_k=32)
        tuning.set("lora_grad_x", warps=8)
        cfg = tuning.get("lora_grad_x")
        assert (cfg["block_k"], cfg["warps"], cfg["block_m"]) == (32, 8, 64)
        cfg["block_m"] = 1  # get returns a copy
        assert tuning.get("lora_grad_x")["block_m"] == 64
    finally:
        tuning.reset("lora_grad_x")
    assert tuning.get("lora_grad_x") == tuning.defaults("lora_grad_x")


def test_unknown_entry_or_key_is_refused():
    with pytest.raises(KeyError, match="no entry 'rms_nrom'"):
        tuning.get("rms_nrom")
    with pytest.raises(KeyError, match="has no key"):
        tuning.set("rope", tiles=(1, 2, 3))
    with pytest.raises(KeyError):
        with tuning.override("lora_dot", split=False):
            pass
    with pytest.raises(ValueError, match="registered twice"):
        tuning.register("rope", tile=(1, 1, 1))
