"""How a long run reports itself: a rich progress bar on a terminal, plain lines otherwise.

Pipelines capture stderr into log files, where a redrawn bar is noise; so when stderr is not a
terminal each epoch is one line. ``--quiet`` silences both.
"""

from __future__ import annotations

import sys
import time

SHOWN = ("elbo_train", "reconstruction_loss_train", "kl_local_train", "elbo_validation", "kl_weight")


def format_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{name}={metrics[name]:.4g}" for name in SHOWN if name in metrics)


def compact_metrics(metrics: dict[str, float]) -> str:
    """The few numbers that fit beside a progress bar on an 80-column terminal."""
    parts = [f"elbo {metrics['elbo_train']:.1f}"] if "elbo_train" in metrics else []
    if "elbo_validation" in metrics:
        parts.append(f"val {metrics['elbo_validation']:.1f}")
    if "kl_weight" in metrics:
        parts.append(f"kl_w {metrics['kl_weight']:.2f}")
    return " ".join(parts)


class SilentReporter:
    def start(self, total_epochs: int, first_epoch: int = 0, description: str = "training") -> None:
        pass

    def epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class LineReporter(SilentReporter):
    """One line per epoch on stderr (or a given stream), flushed, for log files."""

    def __init__(self, stream=None, every: int = 1):
        self.stream = stream or sys.stderr
        self.every = max(1, every)
        self.total = 0

    def start(self, total_epochs: int, first_epoch: int = 0, description: str = "training") -> None:
        self.total = total_epochs
        self.started = time.perf_counter()
        self.message(f"{description}: epochs {first_epoch + 1}..{total_epochs}")

    def epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        if (epoch + 1) % self.every == 0 or epoch + 1 == self.total:
            self.message(f"epoch {epoch + 1}/{self.total} {format_metrics(metrics)}")

    def message(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


class RichReporter(SilentReporter):
    """A live progress bar with the latest losses, for interactive terminals."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=self.console,
        )
        self.task = None

    def start(self, total_epochs: int, first_epoch: int = 0, description: str = "training") -> None:
        self.progress.start()
        self.task = self.progress.add_task(description, total=total_epochs, completed=first_epoch, metrics="")

    def epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.progress.update(self.task, completed=epoch + 1, metrics=compact_metrics(metrics))

    def message(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def close(self) -> None:
        self.progress.stop()


class LogFileReporter(SilentReporter):
    """Forwards to another reporter and also appends every epoch and message to a log file.

    The file starts with whatever header the caller writes (command line, versions), so a run can
    be reproduced from its log alone.
    """

    def __init__(self, inner, path):
        self.inner = inner
        self.file = open(path, "a", encoding="utf-8")
        self.total = 0

    def header(self, lines: list[str]) -> None:
        for line in lines:
            self.file.write(line + "\n")
        self.file.flush()

    def start(self, total_epochs: int, first_epoch: int = 0, description: str = "training") -> None:
        self.total = total_epochs
        self.inner.start(total_epochs, first_epoch, description)
        self._write(f"{description}: epochs {first_epoch + 1}..{total_epochs}")

    def epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.inner.epoch(epoch, metrics)
        values = " ".join(f"{name}={value:.6g}" for name, value in metrics.items())
        self._write(f"epoch {epoch + 1}/{self.total} {values}")

    def message(self, text: str) -> None:
        self.inner.message(text)
        self._write(text)

    def close(self) -> None:
        self.inner.close()
        self.file.flush()

    def record(self, text: str) -> None:
        """Write to the log file only (the terminal gets its own copy of errors and summaries)."""
        self._write(text)

    def close_log(self) -> None:
        self.file.close()

    def _write(self, text: str) -> None:
        self.file.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}\n")
        self.file.flush()


def progress_bar(quiet: bool = False):
    """A bar on an interactive terminal, nothing otherwise: per-chunk lines of an inference pass
    would only be noise in a pipeline's log (its one-line summary says what was written)."""
    return RichReporter() if not quiet and sys.stderr.isatty() else SilentReporter()


def make_reporter(quiet: bool = False, stream=None):
    """Silent with ``quiet``; a bar on an interactive stderr; plain lines otherwise."""
    if quiet:
        return SilentReporter()
    target = stream or sys.stderr
    if stream is None and target.isatty():
        return RichReporter()
    return LineReporter(target)
