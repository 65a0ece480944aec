"""Progress of long phases (training/progress.py): a training bar bounded by its real bound, and plain log lines
(no carriage returns, not a line per step) when the output is not a terminal."""

from __future__ import annotations

import logging
import mmap
import time

import pytest

from llmrec.training import progress as progress_module
from llmrec.training.progress import BoundedProgress, phase, progress, recorded_phases, track_memory


@pytest.fixture
def log_lines(monkeypatch, caplog) -> list[str]:
    monkeypatch.setenv("LLMREC_PROGRESS", "log")
    monkeypatch.setenv("LLMREC_PROGRESS_SECONDS", "0")
    caplog.set_level(logging.INFO, logger="llmrec")
    return caplog


def test_under_a_time_budget_the_bar_measures_the_budget_not_the_step_cap(log_lines):
    bar = BoundedProgress("train", 100_000, time_budget_minutes=1.0, started=time.monotonic() - 30)
    bar.update(10, "loss 3.000")
    assert 49 <= bar.bar.n < 100  # at least half the budget spent (more on a stalled machine); 0.01% of the steps
    bar.close()
    text = log_lines.text
    assert "step 10/100000" in text and "/1 min budget" in text and "loss 3.000" in text and "\r" not in text


def test_without_a_budget_the_bar_counts_steps_to_the_cap(log_lines):
    bar = BoundedProgress("sequence model", 40)
    bar.update(10)
    assert bar.bar.n == 10 and bar.bar.total == 40
    bar.close()


def test_log_lines_are_rate_limited(monkeypatch, caplog):
    monkeypatch.setenv("LLMREC_PROGRESS", "log")
    monkeypatch.setenv("LLMREC_PROGRESS_SECONDS", "30")
    caplog.set_level(logging.INFO, logger="llmrec")
    bar = progress(total=1000, desc="fast phase")
    for _ in range(1000):
        bar.update(1)
    bar.close()
    assert "fast phase" not in caplog.text  # over before the first line is due


def test_phases_record_their_time_and_own_peak(monkeypatch):
    resets = track_memory(True)
    try:
        with phase("outer"):
            with phase("inner"):
                # 40 MiB of fresh pages, touched, then unmapped: a heap allocation could reuse pages already
                # resident after earlier tests and raise no peak at all
                block = mmap.mmap(-1, 40 * 2**20)
                block.write(b"\1" * len(block))
                block.close()
        outer, inner = recorded_phases()
        assert (outer.name, outer.depth, inner.name, inner.depth) == ("outer", 0, "inner", 1)
        assert outer.seconds >= inner.seconds >= 0 and outer.cpu_seconds >= 0
        assert outer.peak_rss_bytes >= inner.peak_rss_bytes >= inner.rss_end_bytes
        if resets:
            assert inner.peak_is_own and inner.peak_rss_bytes - inner.rss_end_bytes > 30 * 2**20
    finally:
        track_memory(False)
    assert progress_module._tracker.stack == []
