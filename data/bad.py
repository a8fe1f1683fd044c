"""Bad-data accounting shared by the shard writer, the encoder and the loader.

Broken inputs are never fatal and never silent: each one is skipped, counted
under a reason, and logged. The first few of each reason are logged one by
one; after that one line at every power of ten keeps a corpus with millions
of bad samples from drowning the log while still saying how many there are.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

# Reasons, so that writer, encoder, loader and manifest agree on the names.
TRUNCATED_TAR = "truncated_tar"  # the tar ends (or breaks) before the samples the manifest promises
UNREADABLE = "unreadable"  # a file or shard that cannot be opened at all
UNDECODABLE = "undecodable"  # image / npy / json / text bytes that do not decode
MISSING_CAPTION = "missing_caption"  # no .txt, or only whitespace
MISSING_IMAGE = "missing_image"  # no jpg / png / webp member
MISSING_FIELD = "missing_field"  # an encoded sample without its latent or text embeddings
ABSURD_SIZE = "absurd_size"  # image sides or member bytes outside sane bounds
BAD_SHAPE = "bad_shape"  # arrays whose shape or dtype disagrees with the manifest
NON_FINITE = "non_finite"  # NaN / inf in latents or embeddings
UNKNOWN_KEY = "unknown_key"  # a member the reader does not know; never decoded (.pyd, .pth, ...)
DUPLICATE_KEY = "duplicate_key"  # the same key twice in the inputs, or the same member twice in a sample
EXTRA_SAMPLE = "extra_sample"  # a shard holds more samples than its manifest says

LOG_FIRST = 5


@dataclass(frozen=True)
class Problem:
    """An input that could not be used: reason (a name above), where, detail, and how many samples it cost."""

    reason: str
    where: str
    detail: str = ""
    count: int = 1


class BadDataLog:
    """Counts problems by reason and logs them (the first few each, then at 10, 100, 1000, ...)."""

    def __init__(self, logger: logging.Logger, counts: dict[str, int] | None = None):
        self.logger = logger
        self.counts: Counter[str] = Counter(counts or {})

    def record(self, reason: str, where: str, detail: str = "", n: int = 1) -> None:
        before = self.counts[reason]
        self.counts[reason] += n
        after = self.counts[reason]
        if before < LOG_FIRST:
            self.logger.warning("skipped %s: %s%s", where, reason, f" ({detail})" if detail else "")
        elif _crossed_power_of_ten(before, after):
            self.logger.warning("%d items skipped so far for %s (latest: %s)", after, reason, where)

    def report(self, p: Problem) -> None:
        self.record(p.reason, p.where, p.detail, p.count)

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


def _crossed_power_of_ten(before: int, after: int) -> bool:
    return len(str(before)) != len(str(after))


def add_counts(*counts: dict[str, int]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for c in counts:
        total.update(c)
    return dict(sorted(total.items()))
