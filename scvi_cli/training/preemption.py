"""Stop requests from the scheduler or the user, turned into a clean stop between two steps.

SLURM sends SIGTERM (or a configured SIGUSR1) before it kills a job; Ctrl-C sends SIGINT. While
training, each of these only sets a flag that the loop polls after every step; the run then saves
its resumable state and exits with 128 + the signal number, so a requeued job can continue. A
second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from scvi_cli.errors import ScviCliError

STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None), signal.SIGINT) if s is not None)


class StopRequest:
    """Callable flag: true once a stop signal has arrived; ``signum`` says which."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum or 0)


class TrainingStopped(ScviCliError):
    """Training stopped on a signal after saving its resumable state; exit 128 + signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@contextmanager
def stop_on_signals(signals=STOP_SIGNALS) -> Iterator[StopRequest]:
    """Within the block, the given signals set the returned StopRequest instead of killing us."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():  # handlers only work there
        yield request
        return

    def handle(signum, frame):
        if request.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        if request.signum is None:
            request.signum = signum

    previous = {s: signal.signal(s, handle) for s in signals}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
