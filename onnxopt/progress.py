"""Progress bars for long work (tqdm), written to stderr so stdout stays clean for --json."""

from __future__ import annotations

import logging
import sys
import time

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


class Steps:
    """A bar over named steps of a long job: `with Steps([...]) as s: s.next("load"); ...`. Each step's
    wall time is logged at INFO (`onnxopt.progress`), bar or not: where a long job's time goes."""

    def __init__(self, names: list[str], *, enabled: bool = True, desc: str | None = None):
        self._names = names
        self._bar = tqdm(
            total=len(names),
            desc=desc,
            disable=not enabled,
            file=sys.stderr,
            bar_format="{desc}{percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} [{elapsed}] {postfix}",
            leave=True,
        )
        self._desc = desc or "job"
        self._started = False
        self._step: tuple[str, float] | None = None

    def _log_step(self) -> None:
        if self._step is not None:
            name, start = self._step
            logger.info("%s: %s took %.1f s", self._desc, name, time.perf_counter() - start)

    def next(self, name: str) -> None:
        if self._started:
            self._bar.update(1)
        self._log_step()
        self._started = True
        self._step = (name, time.perf_counter())
        self._bar.set_postfix_str(name)

    def __enter__(self) -> "Steps":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self._started:
            self._bar.update(1)
            self._bar.set_postfix_str("done")
            self._log_step()
        self._bar.close()


def bar(iterable=None, **kwargs):
    """A tqdm bar on stderr."""
    kwargs.setdefault("file", sys.stderr)
    return tqdm(iterable, **kwargs)
