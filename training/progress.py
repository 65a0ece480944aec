"""Progress of the long phases of a run (training, encoding, calibration, evaluation), readable in a terminal
and in CI logs alike, and the phase timer the scale benchmark (experiments/scale.py) reads.

On a terminal, `progress` is a tqdm bar redrawn at most every `TTY_INTERVAL_S` seconds. Elsewhere (CI, a log
file, `make eval > log`) the same bar is written as plain log lines: the first LOG_DELAY_S seconds after it
starts, then at most every `LOG_INTERVAL_S` seconds (LLMREC_PROGRESS_SECONDS overrides it), and once when it
ends; a phase over within LOG_DELAY_S writes nothing. No carriage returns, no line per step.
LLMREC_PROGRESS=off turns every bar off.

`phase(name)` logs how long a stage took and how much memory the process held; with `track_memory(True)`
(the scale benchmark) it also resets the kernel's peak-RSS mark between phases, so that each phase reports its
own peak (`Phase.peak_rss_bytes`), and keeps the phases in `recorded_phases()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import resource
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm as plain_tqdm
from tqdm.auto import tqdm

log = logging.getLogger("llmrec.progress")

TTY_INTERVAL_S = 0.5
LOG_INTERVAL_S = 30.0
LOG_DELAY_S = 5.0  # a phase shorter than this writes no line at all


class _LogLines(io.TextIOBase):
    """A file for tqdm that turns each redraw into one log line."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self.logger = logger
        self.last = ""

    def write(self, text: str) -> int:
        line = text.replace("\r", "").strip()
        if line and line.split("[")[0] != self.last.split("[")[0]:  # closing redraws the last count
            self.logger.info("%s", line)
            self.last = line
        return len(text)

    def flush(self) -> None:
        pass


class _LoggedBar(plain_tqdm):
    """A bar written as log lines: the first LOG_DELAY_S after it starts, then every `log_interval` seconds."""

    def __init__(self, *args: Any, log_interval: float = LOG_INTERVAL_S, **kwargs: Any) -> None:
        self.log_interval = log_interval
        super().__init__(*args, **kwargs)

    def display(self, *args: Any, **kwargs: Any) -> Any:
        shown = super().display(*args, **kwargs)
        self.mininterval = self.log_interval
        return shown


def _mode() -> str:
    """'bar' on a terminal, 'log' elsewhere, 'off' when LLMREC_PROGRESS=off."""
    wanted = os.environ.get("LLMREC_PROGRESS", "").strip().lower()
    if wanted in ("off", "bar", "log"):
        return wanted
    stream = sys.stderr
    return "bar" if hasattr(stream, "isatty") and stream.isatty() else "log"


def progress(iterable: Iterable | None = None, *, total: float | None = None, desc: str, unit: str = "it",
             disable: bool = False, logger: logging.Logger | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar for a phase: a live bar on a terminal, a log line every LOG_INTERVAL_S seconds elsewhere.

    Use set_postfix_str(..., refresh=False) / set_postfix(..., refresh=False) on it: a refresh per step would
    write a log line per step."""
    mode = _mode()
    if mode == "log":
        interval = float(os.environ.get("LLMREC_PROGRESS_SECONDS", LOG_INTERVAL_S))
        first = min(interval, LOG_DELAY_S)
        return _LoggedBar(iterable, total=total, desc=desc, unit=unit, disable=disable, log_interval=interval,
                          **{"file": _LogLines(logger or log), "mininterval": first, "delay": first,
                             "maxinterval": max(interval, 10.0), "ascii": True, "ncols": 140,
                             "dynamic_ncols": False, **kwargs})
    kwargs = {"mininterval": TTY_INTERVAL_S, "delay": TTY_INTERVAL_S, **kwargs}
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable or mode == "off", **kwargs)


class BoundedProgress:
    """The progress of a training loop bounded by a step cap and, optionally, a time budget: whichever ends it
    first. The bar measures the fraction of that bound (as the learning rate schedule does), so a 100,000-step
    cap under an 80-minute budget shows 80 minutes, not 100,000 steps; the steps and the budget are shown
    beside it."""

    def __init__(self, desc: str, max_steps: int, time_budget_minutes: float = 0.0, disable: bool = False,
                 logger: logging.Logger | None = None, started: float | None = None) -> None:
        """started: time.monotonic() when the budget started (default: now)."""
        self.max_steps = max(1, max_steps)
        self.budget_s = time_budget_minutes * 60
        self.started = time.monotonic() if started is None else started
        self.step = 0
        if self.budget_s:
            self.bar = progress(total=100.0, desc=desc, unit="%", disable=disable, logger=logger,
                                bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]")
        else:
            self.bar = progress(total=self.max_steps, desc=desc, unit="step", disable=disable, logger=logger)

    def fraction(self) -> float:
        by_time = (time.monotonic() - self.started) / self.budget_s if self.budget_s else 0.0
        return min(1.0, max(self.step / self.max_steps, by_time))

    def update(self, step: int, note: str = "") -> None:
        """`step` steps done so far; note: what to show beside them (the loss)."""
        self.step = step
        shown = [note] if note else []
        if self.budget_s:  # the bar is the share of the bound: say what it is made of
            minutes = (time.monotonic() - self.started) / 60
            shown = [f"step {step}/{self.max_steps}", f"{minutes:.1f}/{self.budget_s / 60:g} min budget", *shown]
        self.bar.set_postfix_str(", ".join(shown), refresh=False)
        self.bar.update((100.0 * self.fraction() if self.budget_s else step) - self.bar.n)

    def close(self) -> None:
        self.bar.close()


# --- phases: wall time and memory ---------------------------------------------------------------------------

_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """The process's resident memory now (0 where /proc is missing)."""
    return (_status_kib("VmRSS") or 0) * 1024


def peak_rss_bytes() -> int:
    """The process's peak resident memory since it started or since the mark was last reset."""
    kib = _status_kib("VmHWM")
    return kib * 1024 if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def children_peak_rss_bytes() -> int:
    """The largest peak resident memory of any finished child process (ru_maxrss of RUSAGE_CHILDREN)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False where it cannot."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


@dataclasses.dataclass
class Phase:
    name: str
    depth: int
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # this process's CPU time, all threads: what the phase costs when the CPU is shared
    peak_rss_bytes: int = 0  # the phase's own peak when tracking could reset the mark, else the process's so far
    rss_end_bytes: int = 0
    peak_is_own: bool = False


@dataclasses.dataclass
class _Tracker:
    enabled: bool = False
    resets: bool = False
    process_peak: int = 0  # the largest peak seen, across resets
    stack: list[Phase] = dataclasses.field(default_factory=list)
    stack_peaks: list[int] = dataclasses.field(default_factory=list)
    phases: list[Phase] = dataclasses.field(default_factory=list)


_tracker = _Tracker()


def track_memory(enabled: bool = True) -> bool:
    """Record every phase from now on, each with its own peak RSS; returns whether peaks are per phase (the
    kernel's mark can be reset) or only the process's peak so far."""
    _tracker.enabled = enabled
    _tracker.phases.clear()
    _tracker.process_peak = peak_rss_bytes()
    _tracker.resets = enabled and _reset_peak()
    return _tracker.resets


def recorded_phases() -> list[Phase]:
    return list(_tracker.phases)


def process_peak_rss_bytes() -> int:
    """The process's peak RSS since it started, across the resets of phase tracking."""
    _tracker.process_peak = max(_tracker.process_peak, peak_rss_bytes())
    return _tracker.process_peak


def _fold_peak() -> None:
    """Fold the kernel's mark into every open phase (and the process's), then reset it."""
    peak = peak_rss_bytes()
    _tracker.process_peak = max(_tracker.process_peak, peak)
    _tracker.stack_peaks[:] = [max(p, peak) for p in _tracker.stack_peaks]
    if _tracker.resets:
        _reset_peak()


@contextlib.contextmanager
def phase(name: str, logger: logging.Logger | None = None) -> Iterator[Phase]:
    """Time a stage of a run and log its end (seconds, RSS); recorded with its own peak under track_memory."""
    logger = logger or log
    record = Phase(name, len(_tracker.stack))
    if _tracker.enabled:
        if _tracker.stack:
            _fold_peak()
        elif _tracker.resets:
            _tracker.process_peak = max(_tracker.process_peak, peak_rss_bytes())
            _reset_peak()
        _tracker.stack.append(record)
        _tracker.stack_peaks.append(rss_bytes())
        _tracker.phases.append(record)
    started, cpu_started = time.monotonic(), time.process_time()
    try:
        yield record
    finally:
        record.seconds = round(time.monotonic() - started, 2)
        record.cpu_seconds = round(time.process_time() - cpu_started, 2)
        record.rss_end_bytes = rss_bytes()
        if _tracker.enabled and _tracker.stack and _tracker.stack[-1] is record:
            _fold_peak()
            _tracker.stack.pop()
            record.peak_rss_bytes = _tracker.stack_peaks.pop()
            record.peak_is_own = _tracker.resets
        else:
            record.peak_rss_bytes = peak_rss_bytes()
        logger.info("%s done in %.1f s (%.1f s CPU; RSS %.0f MiB, peak %.0f MiB%s)", name, record.seconds,
                    record.cpu_seconds, record.rss_end_bytes / 2**20, record.peak_rss_bytes / 2**20,
                    "" if record.peak_is_own else " since start")
