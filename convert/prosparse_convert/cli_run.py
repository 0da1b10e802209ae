"""What prosparse-convert and prosparse-calibrate do around their work: bad input is one error line
and exit 1, Ctrl-C (SIGINT) one line and exit 130, SIGTERM one line and exit 143, never a
traceback. SIGTERM is turned into an exception so that the writer's cleanup runs (Python's default
SIGTERM ends the process on the spot and leaves the half-written OUT.tmp-<pid> behind)."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Callable

from .errors import ConvertError


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that `finally` blocks and cleanups run.
    A BaseException, like KeyboardInterrupt, so that `except Exception` does not swallow it."""


def _raise_terminated(signum, frame):
    raise Terminated()


def run_cli(prog: str, body: Callable[[], int]) -> int:
    """body()'s exit code; the error, interrupt and termination lines above otherwise."""
    logging.basicConfig(level=logging.WARNING, format=f"{prog}: %(message)s")
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        return body()
    except ConvertError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)  # a progress bar may hold the line
        return 130
    except Terminated:
        print(f"\n{prog}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
