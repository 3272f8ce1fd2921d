"""Stopping ``fastlora train`` cleanly on Ctrl-C or SIGTERM: the signal only raises a flag, the
step in progress finishes, the trainer saves a checkpoint of it and stops. A second Ctrl-C stops
at once (``KeyboardInterrupt``), keeping the checkpoints already written."""
from __future__ import annotations

import contextlib
import signal
import sys
import threading

from transformers import TrainerCallback


class StopOnSignal(TrainerCallback):
    """Ends training after the current step, with a checkpoint, once ``signal_name`` is set."""

    def __init__(self, stream=None):
        self.signal_name: str | None = None
        self.stopped_at: int | None = None
        self.stream = stream

    def request(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.signal_name = signal.Signals(signum).name
        print(f"\nfastlora: {self.signal_name}: stopping after this step with a checkpoint "
              f"(Ctrl-C again to stop at once)", file=self.stream or sys.stderr, flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.signal_name is not None:
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    @contextlib.contextmanager
    def installed(self):
        """Route SIGINT and SIGTERM to ``request`` while the block runs (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self.request) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
