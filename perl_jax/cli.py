"""What every script does around its work: perl_jax's INFO log, and bad input as one line on stderr, exit 2."""
import logging
import sys
from typing import Callable

from perl_jax import errors


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
