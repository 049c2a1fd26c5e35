"""Training-loop reporting: JSONL + TensorBoard scalars and a one-line progress meter.

Only process 0 writes or prints; on other processes every method is a no-op.
"""
import json
import math
import pathlib
import sys
import time

import jax
import numpy as np
import tensorboardX


def _to_float(value):
  """Host float from a Python, numpy or jax scalar (or size-1 array)."""
  return float(np.asarray(value).reshape(()))


def format_duration(seconds):
  """Human duration: '45s', '3m12s', '2h05m09s'; '?' for negative/nan/inf."""
  if seconds is None or not math.isfinite(seconds) or seconds < 0:
    return "?"
  s = int(round(seconds))
  h, s = divmod(s, 3600)
  m, s = divmod(s, 60)
  if h:
    return f"{h}h{m:02d}m{s:02d}s"
  if m:
    return f"{m}m{s:02d}s"
  return f"{s}s"


def drop_records_after(path: pathlib.Path, step: int) -> int:
  """Rewrites metrics.jsonl without the records of steps > `step` (atomically); returns how many it dropped.

  A run killed after its last checkpoint wrote records for steps it then redoes on resume; without this they
  would appear twice, the stale ones first. A line a kill cut short is dropped too."""
  if not path.is_file():
    return 0

  def kept(line: str) -> bool:
    try:
      return json.loads(line)["step"] <= step
    except (ValueError, KeyError, TypeError):  # A line torn by a kill mid-write: nothing in it can be trusted.
      return False

  lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
  keep = [l if l.endswith("\n") else l + "\n" for l in lines if kept(l)]
  if len(keep) == len(lines):
    return 0
  tmp = path.with_suffix(".jsonl.tmp")
  tmp.write_text("".join(keep), encoding="utf-8")
  tmp.replace(path)
  return len(lines) - len(keep)


class MetricsWriter:
  """Appends {"step", **metrics} lines to workdir/metrics.jsonl and scalars to workdir/tb.

  `resume_step` (the step a run restarts from; 0 for a fresh start) first drops records of later steps from
  metrics.jsonl and purges them from TensorBoard, so the steps a resumed run redoes appear once."""

  def __init__(self, workdir, *, process_index=None, resume_step: int | None = None):
    if process_index is None:
      process_index = jax.process_index()
    self.active = process_index == 0
    self.workdir = pathlib.Path(workdir)
    self._file = self._tb = None
    if not self.active:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.path = self.workdir / "metrics.jsonl"
    purge = None
    if resume_step is not None:
      drop_records_after(self.path, resume_step)
      purge = resume_step + 1
    self._file = open(self.path, "a", encoding="utf-8")
    self._tb = tensorboardX.SummaryWriter(logdir=str(self.workdir / "tb"), purge_step=purge)

  def write(self, step, metrics):
    """Writes one record and flushes both sinks, so a crash loses nothing written."""
    if not self.active:
      return
    step = int(step)
    scalars = {k: _to_float(v) for k, v in metrics.items()}
    self._file.write(json.dumps({"step": step, **scalars}) + "\n")
    self._file.flush()
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)
    self._tb.flush()

  def close(self):
    if self._file is not None:
      self._file.close()
      self._tb.close()
      self._file = self._tb = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class Progress:
  """Prints 'step 120/1000 | loss 0.6421 | 5,321 tok/s | ETA 3m12s' lines to stderr.

  tok/s = tokens since the previous update / wall time since then (or since
  construction); ETA = remaining steps × mean seconds per step since start.
  """

  def __init__(self, total_steps, start_step=0, *, time_fn=time.monotonic,
               stream=None, process_index=None):
    if process_index is None:
      process_index = jax.process_index()
    self.active = process_index == 0
    self.total_steps = int(total_steps)
    self.start_step = int(start_step)
    self._time_fn = time_fn
    self._stream = stream
    self._start_time = self._last_time = time_fn()

  def update(self, step, loss=None, tokens=None, now=None, **extra):
    """Returns (and on process 0 prints) the progress line for `step`; `now` (in time_fn's clock) is when the
    step finished, if the caller knows better than the time of this call."""
    now = self._time_fn() if now is None else now
    dt, self._last_time = now - self._last_time, now
    parts = [f"step {int(step)}/{self.total_steps}"]
    if loss is not None:
      parts.append(f"loss {_to_float(loss):.4f}")
    parts += [f"{k} {_to_float(v):.4g}" for k, v in extra.items()]
    if tokens is not None and dt > 0:
      parts.append(f"{_to_float(tokens) / dt:,.0f} tok/s")
    done = step - self.start_step
    if done > 0:
      eta = (self.total_steps - step) * (now - self._start_time) / done
      parts.append(f"ETA {format_duration(eta)}")
    line = " | ".join(parts)
    if self.active:
      stream = self._stream or sys.stderr
      print(line, file=stream, flush=True)
    return line
