"""ITK and GDCM speak through fedsubtype: their messages are captured, never printed raw.

SimpleITK (>= 2.2) lets a Python `LoggerBase` replace ITK's output window. While a thread is inside
:func:`captured`, what ITK says in that thread is collected there as one-line texts (the caller turns them
into problems); anywhere else it goes to Python logging as one line. Messages that fedsubtype's own checks
say better are dropped.
"""

from __future__ import annotations

import logging
import re
import threading
from contextlib import contextmanager
from typing import Iterator

import SimpleITK as sitk

log = logging.getLogger("fedsubtype.itk")

DROPPED = ("Non uniform sampling or missing slices",)  # the DICOM geometry check names gaps and their fix
_local = threading.local()
_lock = threading.Lock()
_installed: list[sitk.LoggerBase] = []


def one_line(text: str) -> str:
    """ITK's 'WARNING: In /path/file.hxx, line N\\nClass (0x…): message' as 'message' on one line."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not re.match(r"^(WARNING|ERROR|Debug):\s*In\s", ln)]
    body = " ".join(lines)
    body = re.sub(r"^\w+ \(0x[0-9a-fA-F]+\):\s*", "", body)
    return re.sub(r"\s+", " ", body).strip()[:240]


def _route(level: int, text: str) -> None:
    message = one_line(text)
    if not message or any(d in message for d in DROPPED):
        return
    sink = getattr(_local, "sink", None)
    if sink is not None and level >= logging.WARNING:
        sink.append(message)
    else:
        log.log(level, "ITK: %s", message)


class _FedsubtypeLogger(sitk.LoggerBase):
    """Receives every ITK message (errors are also raised as exceptions, so they are only logged at debug)."""

    def DisplayText(self, t: str) -> None:  # noqa: N802 — ITK's names
        _route(logging.INFO, t)

    def DisplayErrorText(self, t: str) -> None:  # noqa: N802
        _route(logging.DEBUG, t)

    def DisplayWarningText(self, t: str) -> None:  # noqa: N802
        _route(logging.WARNING, t)

    def DisplayGenericOutputText(self, t: str) -> None:  # noqa: N802
        _route(logging.INFO, t)

    def DisplayDebugText(self, t: str) -> None:  # noqa: N802
        _route(logging.DEBUG, t)


def install() -> None:
    """Make fedsubtype's logger ITK's global one (once per process)."""
    with _lock:
        if not _installed:
            logger = _FedsubtypeLogger()
            logger.SetAsGlobalITKLogger()
            _installed.append(logger)  # ITK holds a raw pointer: keep the Python object alive


@contextmanager
def captured() -> Iterator[list[str]]:
    """Collect the ITK warnings raised in this thread while inside the block (one line each)."""
    install()
    outer = getattr(_local, "sink", None)
    _local.sink = []
    try:
        yield _local.sink
    finally:
        _local.sink = outer


@contextmanager
def itk_without_threads() -> Iterator[None]:
    """Run ITK filters in the calling thread only (platform threader, one thread), restoring the settings after.

    For callers that already run cases in parallel: ITK's pool threader otherwise starts worker threads
    that live until the process exits (and are known to deadlock around fork), so nothing of ITK's can
    keep working after the caller is done."""
    threader = sitk.ProcessObject.GetGlobalDefaultThreader()
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultThreader("PLATFORM")
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultThreader(threader)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
