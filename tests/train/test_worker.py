"""The worker's stop signals: Ctrl-C raises once and later ones are ignored, SIGTERM ends the
process as it ends any other; the handlers a caller had come back when training ends by itself.
(The whole run stopped by a signal: tests/train/test_process.py.)"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from gossipgrad.train.worker import _stop_signals

_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@pytest.fixture(autouse=True)
def _restore_handlers() -> Iterator[None]:
    saved = {signum: signal.getsignal(signum) for signum in _SIGNALS}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def _torch_like_handler(signum: int, _frame: object) -> None:
    raise RuntimeError(f"got signal {signum}")  # raises for each signal, like torch elastic's


def test_a_second_ctrl_c_is_ignored_while_the_first_unwinds() -> None:
    signal.signal(signal.SIGINT, _torch_like_handler)  # what a forked worker inherits
    unwound = False
    with pytest.raises(KeyboardInterrupt), _stop_signals():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler runs here
        finally:
            os.kill(os.getpid(), signal.SIGINT)  # forwarded by the launcher, mid-unwinding
            time.sleep(0.05)
            unwound = True
    assert unwound
    os.kill(os.getpid(), signal.SIGINT)  # the process is ending: nothing raises any more
    time.sleep(0.05)


def test_sigterm_and_sighup_take_their_default_action_and_handlers_come_back() -> None:
    signal.signal(signal.SIGINT, _torch_like_handler)
    signal.signal(signal.SIGTERM, _torch_like_handler)
    with _stop_signals():
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) is not _torch_like_handler
    assert signal.getsignal(signal.SIGINT) is _torch_like_handler
    assert signal.getsignal(signal.SIGTERM) is _torch_like_handler
