"""Errors meant for a person: a mistake they can fix, said in one sentence that names the value and the fix.

Every such error in the product (config, architecture and layout, checkpoint,
conversion, verification, data) derives from `UserError`. The entry points
(`senseflow VERB`, the torchrun entry `megatron_senseflow.train_cli`) catch it
once: one line on stderr (from rank 0 only under a launcher), exit code
`USER_ERROR`, no traceback. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

USER_ERROR = 2  # exit code of a refused input (argparse uses 2 for bad arguments too)


class UserError(ValueError):
    """A refused input, in one sentence: what is wrong with which value, and what to do."""
