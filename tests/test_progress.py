"""Progress bars (megatron_senseflow/progress.py): drawn on a terminal by the first rank only, never after
--no-progress (which every verb takes and which reaches the processes a verb starts through the environment)."""
from __future__ import annotations

import io
import sys

import pytest


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _drawn(monkeypatch, stream, **kwargs) -> str:
    from megatron_senseflow import progress

    monkeypatch.setattr(sys, "stderr", stream)
    with progress.bar(total=3, desc="encode", unit="shard", **kwargs) as b:
        for _ in range(3):
            b.update(1)
    return stream.getvalue()


def test_a_bar_on_a_terminal_only_on_the_first_rank_and_never_after_no_progress(monkeypatch):
    from megatron_senseflow import progress

    monkeypatch.delenv(progress.ENV, raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert "encode: 100%" in _drawn(monkeypatch, Terminal()) and "3/3" in _drawn(monkeypatch, Terminal())
    assert _drawn(monkeypatch, io.StringIO()) == ""  # a log file or a pipe: no bar
    assert _drawn(monkeypatch, Terminal(), main=False) == ""
    monkeypatch.setenv("RANK", "1")
    assert _drawn(monkeypatch, Terminal()) == ""
    monkeypatch.setenv("RANK", "0")
    assert _drawn(monkeypatch, Terminal(), enabled=False) == ""
    monkeypatch.setenv(progress.ENV, "1")  # restored after the test: set_enabled writes os.environ itself
    progress.set_enabled(False)  # --no-progress: this process and the ones it starts
    assert _drawn(monkeypatch, Terminal()) == "" and progress.ENV in __import__("os").environ


@pytest.mark.parametrize("verb", ["train", "sample", "convert", "export", "verify", "prepare-data", "eval", "demo",
                                  "drill", "slurm", "memory-plan"])
def test_every_verb_takes_no_progress(verb):
    from megatron_senseflow.cli import VERBS, verb_parser

    assert verb in VERBS
    _, parser = verb_parser(verb)
    assert "--no-progress" in parser._option_string_actions
