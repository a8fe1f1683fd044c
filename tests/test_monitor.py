"""The training line a person reads: step of max, the loss terms, the step rate and the time left."""
from __future__ import annotations

from megatron_senseflow.monitor import pace


def test_pace_gives_the_rate_and_the_time_left():
    assert pace(2.5, 10, 130) == ", 2.50 s/it, ETA 5 min 0 s"
    assert pace(0.25, 10, 30) == ", 4.00 it/s, ETA 5 s"
    assert pace(2.0, 0, 4000) == ", 2.00 s/it, ETA 2 h 13 min"
    assert pace(2.0, 30, 30) == ", 2.00 s/it"  # the last line: nothing left
    assert pace(None, 1, 30) == "" and pace(float("nan"), 1, 30) == ""
