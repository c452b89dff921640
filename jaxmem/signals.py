"""Signals: SIGINT and SIGTERM never kill a jaxmem command by a signal, whatever its phase.

Only the standard library is imported here, so that the CLI installs the handlers before it
imports JAX (a Ctrl-C during that import used to print a traceback and die by the signal).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable


class StopRequest:
  """Set by a signal (see :func:`stop_on_signals`); polled by the trainer between host calls.

  ``training`` says whether anyone polls it now (see :func:`training_phase`): only then does a first
  signal wait for the chunk in progress to be saved. ``abort_line`` is what a signal that stops the
  process at once says (the CLI sets it per command)."""

  def __init__(self):
    self._event = threading.Event()
    self.signal_name: str | None = None
    self.training = False
    self.abort_line = "stopped at once; files are written atomically, so none is half-written"
    self.finished_code: int | None = None  # the command's exit code once it has done its work
    self.signals_after_finish = 0

  def finish(self, code: int) -> None:
    """The command has done its work and ends with ``code``: what is left is flushing its output.
    A signal from now on must neither report a stop that did not happen nor change the code."""
    self.finished_code = int(code)

  def set(self, signal_name: str = "stop") -> None:
    self.signal_name = self.signal_name or signal_name
    self._event.set()

  def __call__(self) -> bool:
    return self._event.is_set()


@contextlib.contextmanager
def training_phase(should_stop: Callable[[], bool] | None):
  """Marks the block as polling ``should_stop`` (when it is a :class:`StopRequest`)."""
  if not isinstance(should_stop, StopRequest):
    yield
    return
  should_stop.training = True
  try:
    yield
  finally:
    should_stop.training = False


def _progress_bar_open() -> bool:
  """Whether a tqdm bar is on screen (it ends its line only when it closes). Looked up, not
  imported: this module stays standard-library only."""
  std = sys.modules.get("tqdm.std")
  return bool(std is not None and getattr(std.tqdm, "_instances", None))


def _say(line: str) -> None:
  """Writes one line to stderr from a signal handler: ``os.write`` cannot be re-entered the way a
  buffered ``print`` can (a signal arriving mid-print raised "reentrant call" from the handler).
  Under an open progress bar the line starts on a line of its own (it used to be glued to the bar)."""
  if _progress_bar_open():
    line = "\n" + line
  try:
    os.write(sys.stderr.fileno(), (line + "\n").encode())
  except (OSError, ValueError):
    pass


@contextlib.contextmanager
def stop_on_signals(signals=(signal.SIGINT, signal.SIGTERM), log: Callable[[str], None] | None = None):
  """Within the block, SIGTERM and SIGINT never kill the process by a signal, nor crash it.

  A first signal during training (see :func:`training_phase`) sets the yielded :class:`StopRequest`:
  the chunk in progress is saved at the next host-call boundary and the run stops cleanly. Any other
  signal — a second one, or a first one outside training (start-up, scoring, writing) — ends the
  process at once with ``os._exit(128 + signum)`` after one line (``StopRequest.abort_line``). Once
  the command has finished (:meth:`StopRequest.finish`), a signal changes nothing: the output is
  flushed and the process ends with the command's code (a second such signal ends it at once, with
  that code).

  Why not an exception: re-raising the signal or a KeyboardInterrupt let Python shut down while XLA
  and orbax threads were still working, which crashed the interpreter with a segfault in half the
  tries; and an exception raised from a handler lands wherever the main thread is, including
  garbage-collector callbacks that print it as "Exception ignored ... Traceback" and drop it. Exiting
  at once is safe because every file is written to a temporary name and renamed into place and
  checkpoints are orbax's atomic step directories: at most a temporary file is left, which the next
  run ignores (and a run-directory lock file, which the next run reports as stale and replaces).
  Handlers are restored on exit; outside the main thread this does nothing. ``log`` is unused
  (kept for callers): the handler writes with ``os.write``."""
  stop = StopRequest()
  if threading.current_thread() is not threading.main_thread():
    yield stop
    return
  previous = {s: signal.getsignal(s) for s in signals}

  def handler(signum, frame):
    name = signal.Signals(signum).name
    if stop.finished_code is not None:
      # Everything is written; only the output is being flushed (the test reading it sees the last
      # line and the process then gets its signal here). Let the flush finish and end with the
      # command's own code; a second signal ends it at once with that code (a flush blocked on a
      # full pipe must not make the process unstoppable).
      stop.signals_after_finish += 1
      if stop.signals_after_finish > 1:
        os._exit(stop.finished_code)
      return
    if stop.training and not stop():
      stop.set(name)
      _say(f"jaxmem: {name} received: saving the chunk in progress at the next epoch boundary, then stopping "
           "(send it again to stop at once)")
      return
    if stop():
      _say(f"jaxmem: second {name}: stopped at once; finished chunks are intact and the chunk in progress "
           "resumes from its last checkpoint: rerun the same command")
    else:
      _say(f"jaxmem: {name}: {stop.abort_line}")
    os._exit(128 + signum)

  for s in signals:
    signal.signal(s, handler)
  try:
    yield stop
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
