"""What every script does around its work: perl_jax's INFO log, and bad input (a flag, a config override, a config
file's argument, a data file, a record) as one line on stderr, exit 2."""
import logging
import re
import sys
from typing import Callable

from perl_jax import errors


def _message(e: BaseException) -> str:
  while e.args and isinstance(e.args[0], BaseException):  # ml_collections wraps a KeyError in an AttributeError.
    e = e.args[0]
  return e.args[0] if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str) else str(e)


def flag_error_line(e: BaseException, flag: str = "") -> str:
  """One line for an error raised while parsing the flags: absl's message; for a config file or override that
  failed inside ml_collections (its message holds a traceback or a loader's report), the cause at its end."""
  text = _message(e).strip()
  lines = [ln.strip() for ln in text.splitlines() if ln.strip()] or [type(e).__name__]
  if "Traceback (most recent call last)" in text:  # "flag --config=F: Error whilst parsing config file: <trace>"
    return f"{lines[0].split(': ')[0]}: {re.sub(r'^[A-Za-z_.]*(Error|Exception): ', '', lines[-1])}"
  if "Failed loading config file" in text:  # The config file is missing or does not import.
    return f"flag --{flag or 'config'}: {lines[-1]}"
  if "Did you mean" in text or isinstance(e, AttributeError):  # An unknown config field.
    hint = f" ({lines[-1]})" if len(lines) > 1 else ""
    return f"unknown config field {lines[0]}{hint}"
  return " ".join(lines)


def app_run(main: Callable) -> None:
  """absl's app.run(main), with what goes wrong while parsing the flags (an unknown flag or config field, a bad
  value, a config file that is missing or rejects its argument) printed as one 'error: ...' line, exit 2."""
  from absl import app, flags

  def parse(argv):
    name = ""
    try:
      rest = flags.FLAGS(argv)
      for name in flags.FLAGS:  # A config file that failed to load raises on first access: access it now.
        if type(flags.FLAGS[name]).__name__ == "_ConfigFlag":
          _ = flags.FLAGS[name].value.keys  # A failed load is a placeholder that raises here.
      return rest
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
      print(f"error: {flag_error_line(e, name)}", file=sys.stderr)
      sys.exit(2)
  app.run(main, flags_parser=parse)


def run_or_exit(fn: Callable, *args, info: bool = True, **kwargs):
  """fn(*args, **kwargs), with a DataError / ConfigError / TrainingError printed as 'error: ...' and exit code 2
  (nothing else is printed, so the message is the last line a user sees)."""
  logging.getLogger().setLevel(logging.WARNING)
  logging.getLogger("perl_jax").setLevel(logging.INFO if info else logging.WARNING)
  try:
    return fn(*args, **kwargs)
  except (errors.DataError, errors.ConfigError, errors.TrainingError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
