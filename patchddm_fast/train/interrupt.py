"""Ctrl-C (SIGINT) and SIGTERM as a request to stop after the current step.

The first signal only sets a flag: the trainer finishes the step it is in (so weights,
optimizer and EMA are consistent), saves a checkpoint and returns. A second SIGINT raises
KeyboardInterrupt at once, as usual. Signal handlers can only be installed from the main
thread; elsewhere the request is never set and KeyboardInterrupt behaves as usual.
"""

from __future__ import annotations

import signal
import threading

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def ignore_interrupts(_worker_id: int = 0) -> None:
    """worker_init_fn for DataLoader workers: Ctrl-C in a terminal reaches every process of the
    group, and the workers must keep serving the main process until it has saved."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StopRequest:
    """A context that turns SIGINT / SIGTERM into `requested = True`."""

    def __init__(self, on_request=None):
        self.requested = False
        self.signal_name: str | None = None
        self._on_request = on_request
        self._previous: dict = {}

    def _handle(self, signum, frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        if signum == signal.SIGINT:  # a second Ctrl-C stops at once
            signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT, signal.default_int_handler))
        if self._on_request is not None:
            self._on_request(self.signal_name)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in _SIGNALS:
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
