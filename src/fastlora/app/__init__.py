"""The ``fastlora`` command and what only it uses, apart from the compiler (one level up).

- ``cli``: argument parsing, one-paragraph errors (``fastlora train``, ``fastlora export``).
- ``train``: the training run, start to end; ``sft``: the TRL ``SFTTrainer`` it builds;
  ``run_folder``: the output folder, checkpoints and resuming; ``interrupt``: Ctrl-C and SIGTERM
  as a clean stop; ``progress``: the progress lines and the end-of-run summary.
- ``loading``: model, tokenizer, LoRA and 4-bit loading; ``dataset``: the JSONL formats;
  ``embedded``: the tiny default model, tokenizer and dataset shipped in ``data/``.
- ``export``: merged 16-bit weights and GGUF.
- ``errors``: the errors a user can fix, printed as one paragraph.

The library API (the backend, ``register_pattern``, ``compile_for_trainer``) does not import
this package.
"""
