"""One writer per run directory: a lock with the holder's pid, refused in one line, never stale.

The lock is the kernel's ``flock`` on the run directory itself (exclusive for a whole run, shared
for job-array shards, which also hold an exclusive ``flock`` on their own shard file): the kernel
drops it when the holder exits, however it exits, so a lock can never outlive its process. Beside
it, ``RUN/.jaxmem-lock`` (or ``RUN/.jaxmem-lock-shard-I-of-K``) names the holder — pid, host and
start time — for the refusal line; such a file found when the lock is free was left by a process
that was killed, and is reported as stale and replaced.

Without this, two ``jaxmem run`` on one directory raced for the same chunk's orbax checkpoint
(``Checkpoint directory does not exist: ...orbax-checkpoint-tmp``, ``Directory not empty``) or hung
on each other's asynchronous saves. ``flock`` works on local file systems and, on Linux, on NFS
(where it is emulated with POSIX record locks).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Callable

from jaxmem.errors import JaxmemError

LOCK_FILE = ".jaxmem-lock"


def _holder_file(path: Path, shard: tuple[int, int] | None) -> Path:
  return path / (LOCK_FILE if shard is None else f"{LOCK_FILE}-shard-{shard[0]}-of-{shard[1]}")


def _describe(holder_file: Path) -> str:
  """'process PID on HOST (since T)' from a holder file, or a neutral phrase when it is unreadable."""
  try:
    holder = json.loads(holder_file.read_text())
    text = f"jaxmem process {int(holder['pid'])} on {holder.get('host', '?')} (since {holder.get('since', '?')})"
  except (OSError, ValueError, KeyError, TypeError):
    return "another jaxmem process"
  return text


class RunLock:
  """Holds a run directory for one ``jaxmem run`` (or one shard ``(i, k)`` of a job array).

  Use as a context manager, or :meth:`acquire` / :meth:`release`. Creates the directory if needed
  and removes it again on release if it created it and nothing but the lock is in it (a start that
  failed writes nothing).
  """

  def __init__(self, path: str | os.PathLike, *, shard: tuple[int, int] | None = None,
               log: Callable[[str], None] | None = None):
    self.path = Path(path)
    self.shard = shard
    self.log = log or (lambda message: None)
    self._dir_fd: int | None = None
    self._shard_fd: int | None = None
    self._created = False
    self._held = False

  def __enter__(self) -> "RunLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()

  def acquire(self) -> "RunLock":
    if self.path.exists() and not self.path.is_dir():
      raise JaxmemError(f"output path {str(self.path)!r} exists and is not a directory")
    self._created = not self.path.exists()
    try:
      self.path.mkdir(parents=True, exist_ok=True)
      self._dir_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
      raise JaxmemError(f"cannot create run directory {str(self.path)!r}: {e.strerror or e}") from None
    try:
      self._lock(self._dir_fd, fcntl.LOCK_EX if self.shard is None else fcntl.LOCK_SH)
      if self.shard is not None:
        self._shard_fd = os.open(_holder_file(self.path, self.shard), os.O_RDWR | os.O_CREAT, 0o644)
        self._lock(self._shard_fd, fcntl.LOCK_EX)
      self._held = True
      self._write_holder()
    except BaseException:
      self.release()
      raise
    return self

  def _lock(self, fd: int, mode: int) -> None:
    try:
      fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
        raise JaxmemError(f"cannot lock run directory {str(self.path)!r}: {e.strerror or e}") from None
      raise JaxmemError(f"run directory {str(self.path)!r} is in use by {self._holders()}; wait for it to "
                        "finish or stop it (Ctrl-C saves its chunk in progress)") from None

  def _holders(self) -> str:
    """Who holds the lock: the whole-run holder, else the shards whose lock is taken."""
    whole = _holder_file(self.path, None)
    if whole.exists():
      return _describe(whole)
    held = []
    for file in sorted(self.path.glob(f"{LOCK_FILE}-shard-*")):
      fd = os.open(file, os.O_RDONLY)
      try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # free: that shard is not running
      except OSError:
        index, count = file.name.rsplit("-shard-", 1)[1].split("-of-")
        held.append(f"{_describe(file)} (shard {index}/{count})")
      finally:
        os.close(fd)
    return ", ".join(held) or "another jaxmem process"

  def _write_holder(self) -> None:
    file = _holder_file(self.path, self.shard)
    if file.exists() and file.stat().st_size:
      try:
        pid = json.loads(file.read_text())["pid"]
      except (OSError, ValueError, KeyError, TypeError):
        pid = "?"
      self.log(f"removed a stale lock of process {pid} (no longer holds it) from {self.path}")
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}
    data = (json.dumps(holder) + "\n").encode()
    if self.shard is None:
      file.write_bytes(data)
    else:  # the shard file is the locked file itself: rewritten in place, never replaced
      os.ftruncate(self._shard_fd, 0)
      os.pwrite(self._shard_fd, data, 0)

  def release(self) -> None:
    if self._dir_fd is None:
      return
    holder = _holder_file(self.path, self.shard)
    try:
      if not self._held:
        pass  # refused: the holder's files are the holder's
      elif self._shard_fd is not None:
        os.ftruncate(self._shard_fd, 0)  # kept (others may have it open to test it), but empty
        os.close(self._shard_fd)
        self._shard_fd = None
      elif holder.exists():
        holder.unlink()
      if self._shard_fd is not None:  # refused on the shard file
        os.close(self._shard_fd)
        self._shard_fd = None
      if self._created and self.shard is None and not any(self.path.iterdir()):
        self.path.rmdir()
      elif self._created and self.shard is not None and [p.name for p in self.path.iterdir()] == [holder.name]:
        holder.unlink()
        self.path.rmdir()
    except OSError:
      pass  # the lock itself goes with the descriptor below; a leftover holder file is reported as stale
    finally:
      os.close(self._dir_fd)
      self._dir_fd = None
      self._held = False


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
