"""Errors a user can act on, shown by the command line as one paragraph instead of a traceback."""
from __future__ import annotations

import textwrap


class FastloraError(Exception):
    """A problem with the user's input or machine, with what to do about it.

    ``str(error)`` is the whole paragraph; the command line prints it and exits with status 2
    (``--debug`` adds the traceback).
    """

    def __init__(self, what: str, fix: str | None = None):
        self.what = what.strip()
        self.fix = fix.strip() if fix else None
        super().__init__(self.what + (" " + self.fix if self.fix else ""))


def paragraph(text: str, width: int = 100, prefix: str = "fastlora: error: ") -> str:
    """``text`` wrapped to ``width`` columns after ``prefix``, continuation lines indented."""
    return textwrap.fill(" ".join(text.split()), width=width, initial_indent=prefix,
                         subsequent_indent=" " * 4, break_on_hyphens=False,
                         break_long_words=False)


class Interrupted(FastloraError):
    """``fastlora train`` stopped by Ctrl-C or SIGTERM; says what was kept and how to resume.
    The command line prints it without the ``error:`` prefix and exits with 130 (SIGINT) or
    143 (SIGTERM)."""

    def __init__(self, signal_name: str | None, checkpoint=None):
        self.signal_name = signal_name
        self.checkpoint = checkpoint
        self.exit_code = 143 if signal_name == "SIGTERM" else 130
        if checkpoint is None:
            super().__init__("interrupted before the first checkpoint; nothing was kept.")
        else:
            step = checkpoint.name.rsplit("-", 1)[-1]
            super().__init__(f"interrupted{' by ' + signal_name if signal_name else ''}; the "
                             f"checkpoint at step {step} is in {checkpoint.parent}.",
                             f"Continue with: fastlora train --resume {checkpoint.parent}")


def out_of_memory(exc: BaseException, batch_size: int | None = None,
                  max_length: int | None = None, kept=None) -> FastloraError:
    """The paragraph for a GPU (or host) out-of-memory error during training."""
    first = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else \
        type(exc).__name__
    sizes = []
    if batch_size:
        sizes.append(f"--batch-size {max(1, batch_size // 2)} with --grad-accum 2 (same "
                     f"effective batch)")
    if max_length:
        sizes.append(f"--max-length {max(16, max_length // 2)}")
    tries = "; ".join(sizes + ["--gradient-checkpointing", "--load-in-4bit for a large model"])
    return FastloraError(
        f"The device ran out of memory while training ({first}).",
        f"Make the step smaller: try {tries}. "
        + ("Nothing was saved: the output folder is only written when training finishes."
           if kept is None else f"The checkpoint at step {kept.name.rsplit('-', 1)[-1]} is kept "
                                f"in {kept.parent} (fastlora train --resume continues from it, "
                                f"with the run's own batch size)."))
