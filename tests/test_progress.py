"""A long phase's progress without a terminal (a sweep job's log): named log lines, now and then and at the end."""

from __future__ import annotations

import logging

from lora_sweep.job.status import JobSink, StatusFile
from lora_sweep.progress import Progress


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_a_phase_that_repeats_logs_only_when_it_runs_long(caplog):
    with caplog.at_level(logging.INFO):
        with Progress("val/loss at step 4: 3 images x 2 timesteps", 3, "image", announce=False) as quick:
            quick.update(3)
        assert messages(caplog) == []
        with Progress("val/loss at step 8: 3 images x 2 timesteps", 3, "image", announce=False, every_s=0) as slow:
            slow.describe("image 1")
            slow.update()
    assert messages(caplog)[0] == "val/loss at step 8: 3 images x 2 timesteps: 1/3 images (image 1)"
    assert messages(caplog)[1].startswith("val/loss at step 8: 3 images x 2 timesteps: 1/3 images in ")


def test_the_training_bar_without_a_terminal_is_a_log_line_with_the_runs_name(caplog, monkeypatch):
    monkeypatch.setattr("lora_sweep.progress.EVERY_S", 3600.0)
    sink = JobSink(None, StatusFile("noise=ip"), "noise=ip")
    assert sink.bar.disable  # pytest's stderr is no terminal
    with caplog.at_level(logging.INFO, logger="lora_sweep.job.status"):
        for step in range(4):
            sink.progress(step, 3, 0.25, "2.00 it/s" if step else "")
    sink.bar.close()
    assert messages(caplog) == ["training noise=ip: step 3/3, loss 0.2500, 2.00 it/s"]  # the last step; others < 1 h
