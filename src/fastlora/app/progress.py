"""The progress display of ``fastlora train``: a ``transformers.TrainerCallback`` with a bar (loss,
tokens per second), a summary line every few steps, and the rewrite report once compiled."""
from __future__ import annotations

import sys
import time

from transformers import TrainerCallback


class _Window:
    """Recent (time, tokens, loss) samples for a rate and a mean that ignore compilation."""

    def __init__(self, size: int = 20):
        self.size, self.items = size, []

    def add(self, t: float, tokens: int, loss: float | None):
        self.items = (self.items + [(t, tokens, loss)])[-self.size:]

    def rate(self) -> float | None:
        if len(self.items) < 2:
            return None
        (t0, n0, _), (t1, n1, _) = self.items[0], self.items[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else None

    def loss(self) -> float | None:
        losses = [x[2] for x in self.items if x[2] is not None]
        return sum(losses) / len(losses) if losses else None


class ProgressCallback(TrainerCallback):
    """A progress bar with the loss (mean of the last logged steps) and tokens per second, a
    summary line every ``every`` steps, and the rewrite report printed once after the first
    compiled step (each later recompilation gets one line).

    Tokens are the trainer's count of non-padding tokens: set
    ``include_num_input_tokens_seen="non_padding"`` (and ``logging_steps=1`` for a loss on
    every step) in the training arguments.
    """

    def __init__(self, model, every: int = 10, print_report: bool = True, stream=None,
                 dynamic: bool | None = None):
        self.model, self.every, self.dynamic = model, max(1, every), dynamic
        self.print_report, self.stream = print_report, stream
        self.window, self.bar = _Window(), None
        self.loss_history: list[tuple[int, float]] = []
        self.reported = 0
        self.start = self.first_step_s = None
        self.recompiles: list[int] = []  # steps at which new graphs were compiled
        self.samples: list[tuple[int, float, int]] = []  # (step, time, tokens seen) per step

    def _write(self, text: str):
        if self.bar is not None and not self.bar.disable:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        self.start = time.perf_counter()
        stream = self.stream or sys.stderr
        # Not a terminal (a log file, CI): no bar, the summary lines every `every` steps remain.
        self.bar = tqdm(total=state.max_steps, unit="step", dynamic_ncols=True, file=stream,
                        desc="training", leave=False,
                        disable=not getattr(stream, "isatty", lambda: False)())

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self.first_step_s is None:
            self.first_step_s = now - self.start
        self.window.add(now, state.num_input_tokens_seen, None)
        self.samples.append((state.global_step, now, state.num_input_tokens_seen))
        self._report_new_graphs(state.global_step)
        self.bar.update(1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs or not self.window.items:
            return
        step, loss = state.global_step, float(logs["loss"])
        self.loss_history.append((step, loss))
        t, tokens, _ = self.window.items[-1]
        self.window.items[-1] = (t, tokens, loss)
        mean, rate = self.window.loss(), self.window.rate()
        post = {"loss": f"{mean:.3f}"}
        if rate is not None:
            post["tok/s"] = f"{rate:,.0f}"
        self.bar.set_postfix(post)
        if step % self.every == 0 or step == state.max_steps:
            self._write(f"step {step:>5}/{state.max_steps}  loss {mean:.3f}  "
                        f"tokens/s {_fmt(rate, '{:>7,.0f}')}  elapsed {t - self.start:6.1f}s")

    def _report_new_graphs(self, step: int):
        from ..report import Reports, reports

        graphs = reports(self.model)
        if len(graphs) <= self.reported:
            return
        new = Reports(graphs[self.reported:])
        if self.reported:
            self.recompiles.append(step)
        if self.print_report and not self.reported:
            self._write(f"compiled in {self.first_step_s:.1f}s (first step, forward and "
                        f"backward); fastlora rewrite report:\n{graphs}\n")
        elif self.print_report:
            counts = ", ".join(f"{k} x{v}" for k, v in new.counts().items()) or "no matches"
            how = {None: " (dynamic shapes from now on)", False: " (static shapes: one per "
                   "shape)", True: ""}[self.dynamic]
            self._write(f"step {step}: compiled {len(new)} more graph(s) for a new input "
                        f"shape{how}: {counts}")
        self.reported = len(graphs)

    def steady_tokens_per_second(self) -> float | None:
        """Tokens per second from the step after the last compilation to the end."""
        last = max([1] + self.recompiles)
        after = [s for s in self.samples if s[0] >= last]
        if len(after) < 2 or after[-1][1] <= after[0][1]:
            return None
        return (after[-1][2] - after[0][2]) / (after[-1][1] - after[0][1])

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _fmt(value, spec: str = "{:.3f}") -> str:
    return "      -" if value is None else spec.format(value)
