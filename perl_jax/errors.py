"""The three errors a user sees as one line (`cli.run_or_exit` prints "error: ..." and exits 2)."""


class ConfigError(ValueError):
  """A config or weights file that cannot be used; the message names the file and field."""


class DataError(ValueError):
  """One bad input record: the message is a single line naming file, line and field."""

  def __init__(self, path, line=None, field=None, problem=""):
    self.path, self.line, self.field, self.problem = str(path), line, field, problem
    where = self.path if line is None else f"{self.path}:{line}"
    what = problem if field is None else f"field '{field}': {problem}"
    super().__init__(f"{where}: {what}")


class TrainingError(RuntimeError):
  """A run cannot go on (e.g. a non-finite loss or reward); the last good checkpoint is kept."""
