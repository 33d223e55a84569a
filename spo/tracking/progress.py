"""What a person watching the terminal sees: one tqdm bar per long loop, and `logging` for the rest.

Bars go to stderr. On a terminal they refresh every second; in a log file (CI, a KFP pod) they write a
line at most every 30 s, so logs stay readable. `SPO_PROGRESS=0` turns them off.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

T = TypeVar("T")
LOG_FORMAT = "%(asctime)s %(name)s: %(message)s"
# Libraries that log routine chatter at INFO on every stage run; their warnings still show.
QUIET_LOGGERS = ("mlflow", "alembic", "great_expectations", "httpx", "urllib3", "filelock", "dvc")


def progress(iterable: Iterable[T] | None = None, *, desc: str, total: int | None = None,
             unit: str = "step", initial: int = 0) -> tqdm:
    """A tqdm bar for a loop of more than ~10 s; set its key numbers with `bar.set_postfix(...)`."""
    interactive = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, unit=unit, initial=initial, file=sys.stderr, dynamic_ncols=True,
                mininterval=1.0 if interactive else 30.0, disable=os.environ.get("SPO_PROGRESS") == "0")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (pytest and tqdm swap it), not the one at setup."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # logging.StreamHandler.__init__ assigns it
        pass


def configure_logging(level: int = logging.INFO) -> None:
    """INFO for `spo.*` on stderr, WARNING for chatty libraries (idempotent)."""
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        root.addHandler(_StderrHandler())
    root.setLevel(level)
    # MLflow draws a bar for every artifact it copies while registering a model: dozens of instant bars
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


@contextmanager
def no_library_bars(*locations: str | os.PathLike | None) -> Iterator[None]:
    """Hide transformers' instant "Writing model shards" / "Loading weights" bars around saving, or loading
    from local directories. Loads from the hub keep them: there they are the only sign of a long download."""
    from transformers.utils import logging as hf_logging

    if any(loc is not None and not os.path.isdir(loc) for loc in locations):
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


@contextmanager
def terminal_output() -> Iterator[None]:
    """Logging configured, and log lines written around (not through) any active progress bar."""
    configure_logging()
    with logging_redirect_tqdm():
        yield
