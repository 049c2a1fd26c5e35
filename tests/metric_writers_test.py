"""Tests for perl_jax.metric_writers: JSONL/TensorBoard round trips and Progress arithmetic."""
import io
import json
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from perl_jax import metric_writers
from tests.helpers import load_script


def _read_events(path):
  """Parses a TFRecord event file by hand: u64 length, u32 crc, data, u32 crc."""
  events, data = [], path.read_bytes()
  pos = 0
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    pos += 12
    events.append(event_pb2.Event.FromString(data[pos:pos + length]))
    pos += length + 4
  assert pos == len(data)
  return events


def _scalars(tb_dir):
  out = {}
  for path in sorted(tb_dir.glob("events.out.tfevents.*")):
    for event in _read_events(path):
      for value in event.summary.value:
        out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


def test_jsonl_round_trip_and_value_types(tmp_path):
  w = metric_writers.MetricsWriter(tmp_path, process_index=0)
  w.write(1, {"loss": 0.5, "acc": np.float32(0.25)})
  w.write(np.int64(2), {"loss": jnp.array(0.125), "lr": jnp.array([3e-4])})
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l) for l in lines] == [
      {"step": 1, "loss": 0.5, "acc": 0.25},
      {"step": 2, "loss": 0.125, "lr": pytest.approx(3e-4)},
  ]
  w.close()


def test_jsonl_flushed_before_close(tmp_path):
  w = metric_writers.MetricsWriter(tmp_path, process_index=0)
  w.write(7, {"x": 1.0})
  assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 7, "x": 1.0}
  w.close()


def test_reopen_appends(tmp_path):
  with metric_writers.MetricsWriter(tmp_path, process_index=0) as w:
    w.write(1, {"loss": 1.0})
  with metric_writers.MetricsWriter(tmp_path, process_index=0) as w:
    w.write(2, {"loss": 2.0})
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [1, 2]


def test_tensorboard_scalars_read_back(tmp_path):
  w = metric_writers.MetricsWriter(tmp_path, process_index=0)
  w.write(3, {"loss": 0.75, "reward/mean": np.float64(-1.5)})
  w.write(4, {"loss": 0.5})
  w.close()
  files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
  assert files
  got = _scalars(tmp_path / "tb")
  assert got["loss"] == [(3, 0.75), (4, 0.5)]
  assert got["reward/mean"] == [(3, -1.5)]


def test_non_zero_process_is_noop(tmp_path):
  w = metric_writers.MetricsWriter(tmp_path / "run", process_index=1)
  w.write(1, {"loss": 1.0})
  w.close()
  assert not (tmp_path / "run").exists()


def test_default_process_index_writes(tmp_path):
  with metric_writers.MetricsWriter(tmp_path) as w:
    w.write(0, {"a": 1})
  assert (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("seconds,text", [
    (0, "0s"), (45.4, "45s"), (59.6, "1m00s"), (192, "3m12s"),
    (3600, "1h00m00s"), (7509, "2h05m09s"), (-1, "?"), (float("nan"), "?"),
    (float("inf"), "?"),
])
def test_format_duration(seconds, text):
  assert metric_writers.format_duration(seconds) == text


class FakeClock:

  def __init__(self, t=100.0):
    self.t = t

  def __call__(self):
    return self.t


def test_progress_throughput_and_eta():
  clock, stream = FakeClock(), io.StringIO()
  p = metric_writers.Progress(1000, time_fn=clock, stream=stream, process_index=0)
  clock.t += 20.0
  line = p.update(100, loss=0.64213, tokens=106_420)
  # 106420 tok / 20 s = 5321 tok/s; 900 steps left × 0.2 s/step = 180 s.
  assert line == "step 100/1000 | loss 0.6421 | 5,321 tok/s | ETA 3m00s"
  clock.t += 2.0
  line = p.update(120, loss=0.5, tokens=4_000, lr=3e-4)
  # 4000 / 2 = 2000 tok/s; 880 left × 22 s / 120 steps = 161.33 s.
  assert line == "step 120/1000 | loss 0.5000 | lr 0.0003 | 2,000 tok/s | ETA 2m41s"
  assert stream.getvalue().splitlines() == [
      "step 100/1000 | loss 0.6421 | 5,321 tok/s | ETA 3m00s",
      "step 120/1000 | loss 0.5000 | lr 0.0003 | 2,000 tok/s | ETA 2m41s",
  ]


def test_progress_resume_and_degenerate_calls():
  clock, stream = FakeClock(), io.StringIO()
  p = metric_writers.Progress(100, start_step=50, time_fn=clock, stream=stream, process_index=0)
  assert p.update(50, loss=1.0, tokens=10) == "step 50/100 | loss 1.0000"
  clock.t += 10.0
  # ETA from steps done since resume: 40 left × 10 s / 10 steps.
  assert p.update(60, tokens=jnp.array(500)) == "step 60/100 | 50 tok/s | ETA 40s"


def test_progress_other_process_returns_but_does_not_print(capsys):
  clock = FakeClock()
  p = metric_writers.Progress(10, time_fn=clock, process_index=3)
  clock.t += 1.0
  assert p.update(5, loss=0.1) == "step 5/10 | loss 0.1000 | ETA 1s"
  assert capsys.readouterr().err == ""


def test_progress_prints_to_stderr(capsys):
  clock = FakeClock()
  p = metric_writers.Progress(4, time_fn=clock, process_index=0)
  clock.t += 3.0
  p.update(2, loss=1.0)
  captured = capsys.readouterr()
  assert captured.err == "step 2/4 | loss 1.0000 | ETA 3s\n"
  assert captured.out == ""


def test_plot_curves_wall_clock_is_summed_step_time_and_png_written(tmp_path):
  """scripts/plot_curves.py: eval points at their step, wall-clock = Σ step_time × steps per log interval
  (by hand: 2×1.5 + 2×2.5 = 8 s at step 4), a resumed run's repeated rows counted once."""
  import json
  import subprocess
  import sys
  from tests.conftest import ROOT
  run = tmp_path / "run"
  run.mkdir()
  rows = [{"step": 2, "train/step_time_s": 1.5}, {"step": 4, "train/step_time_s": 2.5},
          {"step": 4, "eval/roc_auc": 0.6}, {"step": 4, "train/step_time_s": 9.0},   # resumed: step 4 again
          {"step": 6, "train/step_time_s": 1.0}, {"step": 6, "eval/roc_auc": 0.7}]
  (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  module = load_script("plot_curves")
  assert module.curve(run, "roc_auc") == [{"step": 4, "wall_s": 8.0, "value": 0.6},
                                          {"step": 6, "wall_s": 10.0, "value": 0.7}]
  out = tmp_path / "c.png"
  r = subprocess.run([sys.executable, "scripts/plot_curves.py", f"--run=a={run}", "--baseline=0.65",
                      f"--out={out}"], cwd=ROOT, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-2000:]
  assert out.stat().st_size > 1000 and json.loads(r.stdout)["curves"]["a"][1]["value"] == 0.7


def test_resume_step_drops_later_records_and_keeps_earlier_ones(tmp_path):
  with metric_writers.MetricsWriter(tmp_path, process_index=0) as w:
    for step in (1, 2, 3, 4):
      w.write(step, {"loss": float(step)})
  with metric_writers.MetricsWriter(tmp_path, process_index=0, resume_step=2) as w:
    w.write(3, {"loss": 30.0})
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert lines == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 30.0}]
  assert not list(tmp_path.glob("*.tmp"))


def test_resume_drops_a_line_torn_by_a_kill(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n{"step": 3, "lo')
  with metric_writers.MetricsWriter(tmp_path, process_index=0, resume_step=2) as w:
    w.write(3, {"loss": 3.0})
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [1, 2, 3] and lines[-1]["loss"] == 3.0
