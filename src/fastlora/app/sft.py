"""The TRL side of ``fastlora train``: the ``SFTConfig``, the batch collator (padding-free by
default) and the ``SFTTrainer`` built from a ``TrainConfig``."""
from __future__ import annotations

import dataclasses
import pathlib


def sft_config(cfg, out: pathlib.Path, device: str, dtype, lr: float):
    import torch
    from trl import SFTConfig

    steps = {"max_steps": -1, "num_train_epochs": cfg.epochs} if cfg.epochs else \
        {"max_steps": cfg.steps}
    # transformers 5 takes a fraction in warmup_steps; 4.x has warmup_ratio for it
    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    steps["warmup_ratio" if "warmup_ratio" in fields else "warmup_steps"] = cfg.warmup_ratio
    saving = {"save_strategy": "steps", "save_steps": cfg.checkpoint_every,
              "save_total_limit": 1} if cfg.checkpoint_every else {"save_strategy": "no"}
    return SFTConfig(
        output_dir=str(out), **steps, **saving, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=lr,
        lr_scheduler_type="linear", max_length=cfg.max_length,
        pad_to_multiple_of=cfg.pad_to_multiple_of or None, dataloader_drop_last=True,
        packing=cfg.packing, packing_strategy="bfd",
        gradient_checkpointing=cfg.gradient_checkpointing, seed=cfg.seed, data_seed=cfg.seed,
        ddp_find_unused_parameters=False,  # every adapter takes part in every step
        bf16=device == "cuda" and dtype == torch.bfloat16,
        fp16=device == "cuda" and dtype == torch.float16, use_cpu=device == "cpu",
        logging_steps=1, report_to=[], disable_tqdm=True,
        include_num_input_tokens_seen="non_padding", dataset_num_proc=None)


def padding_free_collator(cfg, tokenizer, model):
    """TRL's own collator in its padding-free mode: a batch's examples concatenated into one row,
    ``position_ids`` restarting at each example, no attention mask (what ``SFTConfig(
    padding_free=True)`` builds). Passed to the trainer as a collator because TRL refuses
    ``padding_free=True`` together with ``max_length`` unless packing, and fastlora train keeps
    TRL's truncation to ``max_length``. ``None`` when the batches are padded instead (TRL's
    default collator; with ``--packing`` TRL's BFD packing is padding-free already)."""
    if not cfg.padding_free or cfg.packing:
        return None
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    if tokenizer.pad_token is None:  # what SFTTrainer does when it builds the collator itself
        tokenizer.pad_token = tokenizer.eos_token
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    return DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id,
                                           padding_free=True,
                                           pad_to_multiple_of=cfg.pad_to_multiple_of or None)


def build_trainer(model, tokenizer, rows, sft_args, callbacks, collator=None):
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTTrainer

    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer, callbacks=callbacks, data_collator=collator)
    for cb in (PrinterCallback, ProgressCallback):  # our own bar replaces them
        trainer.remove_callback(cb)
    return trainer


def keep_adapters_in(model, dtype) -> int:
    """TRL's SFTTrainer stores a 4-bit model's adapters in bfloat16 (the QLoRA paper's recipe
    for bfloat16 compute). With float32 weights asked for (``--dtype fp32``, the CPU default)
    that makes every adapter round its float32 input to bfloat16, which the fused QLoRA op does
    not reproduce; the adapters go back to ``dtype`` before the optimizer is made. Returns how
    many tensors were cast."""
    import torch

    if dtype != torch.float32:
        return 0
    cast = 0
    for name, param in model.named_parameters():
        if param.requires_grad and "lora_" in name and param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast += 1
    return cast
