"""The one exception type a user is meant to see.

Every check on user input raises :class:`JaxmemError` with a single line that names the bad value
and what is allowed. The CLI prints that line and exits non-zero without a traceback; library
callers can catch it like any ``ValueError``.
"""


class JaxmemError(ValueError):
  """Bad input or state, described in one line for a person to act on."""


def one_of(kind: str, value, allowed) -> JaxmemError:
  """Error for a name that is not in a registry, listing the valid names."""
  allowed = sorted(allowed)
  return JaxmemError(f"unknown {kind} {value!r}; choose one of: {', '.join(map(str, allowed))}")
