"""Benchmark machinery: preset sizes, counts, the memory formula, abstract full vs LoRA, CLI wiring."""
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import traverse_util

from perl_jax import lora, models, trainer
from perl_jax.bench import rm_step
from tests.helpers import load_script


@pytest.mark.parametrize("name", sorted(rm_step.KNOWN_TOTALS))
def test_preset_totals_match_published_sizes(name):
  total = models.count_params(models.param_shapes(rm_step.preset(name)))
  assert total == rm_step.KNOWN_TOTALS[name]


def test_smollm2_and_llama2_7b_sizes():
  assert models.count_params(models.param_shapes(rm_step.preset("smollm2-135m"))) == 134_515_008
  assert models.count_params(models.param_shapes(rm_step.preset("7b"))) == 6_738_415_616


@pytest.mark.parametrize("targets", [lora.ATTENTION, lora.ATTENTION_MLP])
def test_lora_trainable_count_is_closed_form_plus_head(targets):
  cfg, lcfg = rm_step.preset("smollm2-135m"), lora.LoraConfig(rank=4, targets=targets)
  _, _, state, base = rm_step.build(cfg, "lora", "bfloat16", lcfg, abstract=True)
  assert models.count_params(state["trainable"]) == lora.closed_form_count(cfg, lcfg) + cfg.hidden_size + 1
  assert jax.tree.leaves(base)[0].dtype == jnp.bfloat16
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["trainable"]))


def test_full_mode_trains_fp32_copy_and_has_no_base():
  _, _, state, base = rm_step.build(rm_step.preset("tiny"), "full", "bfloat16", lora.LoraConfig(), abstract=True)
  assert base == {}
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["trainable"]))
  assert isinstance(jax.tree.leaves(state)[0], jax.ShapeDtypeStruct)


def test_memory_formula_is_argument_plus_output_plus_temp_minus_alias():
  f = jax.jit(lambda x, y: (x * 2, jnp.sin(y) @ y), donate_argnums=(0,))
  a = f.lower(jax.ShapeDtypeStruct((256, 256), jnp.float32), jax.ShapeDtypeStruct((64, 64), jnp.float32)).compile()
  analysis = a.memory_analysis()
  m = trainer.memory_bytes(analysis)
  assert m["compiled_peak_bytes"] == (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                                      + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
  fake = types.SimpleNamespace(argument_size_in_bytes=10, output_size_in_bytes=7, temp_size_in_bytes=5,
                               alias_size_in_bytes=3, peak_memory_in_bytes=0)
  assert trainer.memory_bytes(fake)["compiled_peak_bytes"] == 19


@pytest.fixture(scope="module")
def tiny_rows():
  return [rm_step.measure(rm_step.preset("tiny"), mode, name="tiny", pairs=2, seq=32, abstract=True)
          for mode in ("full", "lora")]


def test_abstract_full_needs_more_memory_than_lora(tiny_rows):
  full, lora_row = tiny_rows
  assert full["compiled_peak_bytes"] > lora_row["compiled_peak_bytes"] > 0
  assert full["step_s"] is None and full["peak_bytes_in_use"] is None
  assert full["sequences"] == 4 and full["tokens_per_step"] == 4 * 32
  (c,) = rm_step.compare(tiny_rows)
  assert 0 < c["memory_ratio"] < 1
  table = rm_step.markdown(tiny_rows)
  assert "speedup ceiling" in table and "| tiny | lora |" in table


def test_flop_formula_and_speedup_ceiling():
  cfg = rm_step.preset("7b")
  n_lora = 8_388_608
  full, lo = (rm_step.step_flops(cfg, m, n_lora, sequences=2, seq=8, remat="none") for m in ("full", "lora"))
  assert full["model_flops"] / lo["model_flops"] == pytest.approx(1.5, rel=0.01)
  full, lo = (rm_step.step_flops(cfg, m, n_lora, sequences=2, seq=8, remat="full") for m in ("full", "lora"))
  assert full["hardware_flops"] / lo["hardware_flops"] == pytest.approx(4 / 3, rel=0.01)
  assert "4*N_mm*tokens" in lo["flop_formula"] and "6*N_mm*tokens" in full["flop_formula"]
  assert rm_step.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert rm_step.peak_flops("cpu") is None


def _cli():
  return load_script("benchmark")


def test_cli_rl_phase_abstract_and_timed_on_tiny(tmp_path, capsys):
  """--phase rl compiles the RL update with every role resident: LoRA holds one backbone, full four."""
  out = tmp_path / "rl.jsonl"
  assert _cli().main(["--phase", "rl", "--model", "tiny", "--abstract", "--out", str(out)]) == 0
  rows = {r["mode"]: r for r in map(json.loads, out.read_text().splitlines())}
  backbone = rows["lora"]["backbone_params"]
  assert rows["lora"]["frozen_params"] < 1.2 * backbone < rows["full"]["frozen_params"]
  assert rows["full"]["trainable_params"] > 1.9 * backbone  # policy + value copies
  assert rows["lora"]["trainable_params"] < 0.25 * backbone  # policy + value adapters and head
  assert rows["lora"]["compiled_peak_bytes"] < rows["full"]["compiled_peak_bytes"]
  assert "LoRA/full compiled peak" in capsys.readouterr().out
  assert _cli().main(["--phase", "rl", "--model", "tiny", "--modes", "lora", "--steps", "1", "--out", str(out)]) == 0
  timed = json.loads(out.read_text().splitlines()[-1])
  assert timed["step_s"] > 0 and len(timed["step_times_s"]) == 2
  assert 0 < timed["rollout_s"] and 0 < timed["update_s"] and timed["rollout_s"] + timed["update_s"] <= timed["step_s"]


def test_cli_abstract_writes_jsonl(tmp_path, capsys):
  out = tmp_path / "rows.jsonl"
  assert _cli().main(["--model", "tiny", "--modes", "lora", "--abstract", "--out", str(out)]) == 0
  import json
  (row,) = [json.loads(line) for line in out.read_text().splitlines()]
  assert row["model"] == "tiny" and row["mode"] == "lora" and row["flop_formula"]
  assert "| tiny | lora |" in capsys.readouterr().out


def test_cli_against_torch_prints_ratio_line(tmp_path, capsys):
  pytest.importorskip("torch")
  pytest.importorskip("peft")
  out = tmp_path / "rows.jsonl"
  assert _cli().main(["--model", "tiny", "--against", "torch", "--steps", "1", "--remat", "dots", "--out",
                      str(out)]) == 0
  line = capsys.readouterr().out.strip().splitlines()[-1]
  assert line.startswith("ours ") and "torch+peft" in line and "ours/torch" in line and "remat dots" in line
  import json
  (row,) = [json.loads(r) for r in out.read_text().splitlines()]
  assert row["ratio"] == pytest.approx(row["ours_s"] / row["torch_s"])
  alt = row["alternating_step_times_s"]
  assert row["alternating_ratio"] == pytest.approx(alt["ours"][0] / alt["torch"][0])  # One step each: its time.
  assert f"alternating ours/torch {row['alternating_ratio']:.2f}x" in line
  assert row["peft_targets"] == ["k_proj", "o_proj", "q_proj", "v_proj"] and row["remat"] == "dots"
  # Same weights, head and batch: the first (pre-update) Bradley-Terry losses agree.
  assert row["first_loss"]["ours"] == pytest.approx(row["first_loss"]["torch"], rel=1e-4)
  for phase in ("fwd", "fwd_bwd"):
    p = row["phases"][phase]
    assert p["ratio"] == pytest.approx(p["ours_s"] / p["torch_s"]) and p["ours_s"] > 0
    assert p["ours_s"] == pytest.approx(sorted(row["step_times_s"][f"ours_{phase}"])[0])  # One step: its time.
  assert "forward only" in line and "forward+backward" in line


def test_phase_functions_give_torch_scores_and_head_gradient():
  """--against torch also times forward only and forward+backward; both sides compute the same thing there too."""
  pytest.importorskip("torch")
  pytest.importorskip("peft")
  from perl_jax import lora, models
  from perl_jax.bench import torch_compare
  cfg = rm_step.preset("tiny")
  base = models.init_params(cfg, jax.random.key(0))
  lora_cfg = lora.LoraConfig(rank=4, alpha=8)
  ours = rm_step.prepare(cfg, "lora", name="tiny", pairs=2, seq=16, dtype="float32", lora_cfg=lora_cfg,
                           base_params=base)
  model = torch_compare.torch_model(cfg, jax.device_get(base), lora_cfg,
                                  jax.device_get(ours.state["trainable"]["head"]["kernel"]))
  mine, theirs = torch_compare.our_phase_fns(ours), torch_compare.torch_phase_fns(
      model, ours.host_batch["input_ids"])
  np.testing.assert_allclose(np.asarray(mine["fwd"]()), theirs["fwd"]().numpy()[:, 0], rtol=1e-4, atol=1e-5)
  grads = mine["fwd_bwd"]()
  theirs["fwd_bwd"]()
  (score,) = [p for n, p in model.named_parameters() if "score" in n and p.requires_grad]
  np.testing.assert_allclose(np.asarray(grads["head"]["kernel"])[:, 0], score.grad.numpy()[0], rtol=1e-3, atol=1e-6)
  assert np.abs(score.grad.numpy()).max() > 1e-4


def test_cli_against_torch_without_extras_is_one_line(monkeypatch, capsys):
  import builtins
  real_import = builtins.__import__

  def no_peft(name, *args, **kwargs):
    if name == "peft" or name.startswith("peft."):
      raise ImportError("No module named 'peft'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_peft)
  assert _cli().main(["--model", "tiny", "--against", "torch"]) == 2
  assert capsys.readouterr().err.strip().splitlines() == [
      "error: --against torch needs the test extras: pip install -r requirements-test.txt"]


def test_torch_worker_error_is_raised_in_the_parent():
  """The torch side runs in a spawned process; its failure (here: weights missing the final norm) is one
  RuntimeError in the parent, with the worker's exception."""
  pytest.importorskip("torch")
  pytest.importorskip("peft")
  from perl_jax import lora, models
  from perl_jax.bench import torch_compare
  cfg = rm_step.preset("tiny")
  wrong = jax.device_get(models.init_params(cfg, jax.random.key(0)))
  del wrong["final_norm"]
  head = np.zeros((cfg.hidden_size, 1), np.float32)
  msg = r"^torch worker: ValueError: weights do not fit the HF model: missing \['model.norm.weight'\]"
  with pytest.raises(RuntimeError, match=msg):
    torch_compare.TorchWorker(cfg, wrong, lora.LoraConfig(rank=2, alpha=4), head, np.ones((1, 2, 8), np.int64), 1)


def test_isolated_modes_keep_finished_rows_when_a_later_mode_dies(tmp_path, monkeypatch):
  """Each mode runs in a child; its rows reach --out when that child ends, so a time limit (or a crash) in the
  second mode leaves the first mode's row on disk and the run exits non-zero."""
  cli = _cli()
  calls = []

  def fake_run(cmd, **_):
    mode, child_out = cmd[cmd.index("--modes") + 1], cmd[cmd.index("--out") + 1]
    calls.append(mode)
    if mode == "lora":
      return types.SimpleNamespace(returncode=137)
    with open(child_out, "a") as f:
      f.write(json.dumps({"mode": mode, "step_s": 0.5}) + "\n")
    return types.SimpleNamespace(returncode=0)

  monkeypatch.setattr(cli.subprocess, "run", fake_run)
  out = tmp_path / "rows.jsonl"
  with pytest.raises(SystemExit) as e:
    cli.main(["--model", "tiny", "--modes", "full,lora", "--out", str(out)])
  assert e.value.code == 137 and calls == ["full", "lora"]
  assert [json.loads(line) for line in out.read_text().splitlines()] == [{"mode": "full", "step_s": 0.5}]


def test_cli_quant_rows_store_the_lora_base_quantized(tmp_path, capsys):
  """--quant adds one LoRA row per storage (full rows stay float): the frozen base's bytes shrink to the codes and
  scales (nf4 ≈ 1/8 of float32 on the layer kernels), the compiled arguments with them, and each LoRA row is
  compared with the one full row. An unknown kind is a one-line flag error."""
  out = tmp_path / "q.jsonl"
  assert _cli().main(["--model", "tiny", "--abstract", "--dtype", "float32", "--quant", "none,int8,nf4,nf4dq",
                      "--quant_block", "16", "--out", str(out)]) == 0
  rows = {(r["mode"], r["quant"] + ("dq" if r.get("quant_double") else "")): r
          for r in map(json.loads, out.read_text().splitlines())}
  assert set(rows) == {("full", "none"), ("lora", "none"), ("lora", "int8"), ("lora", "nf4"), ("lora", "nf4dq")}
  kernels = models.count_params(models.param_shapes(rm_step.preset("tiny"))["layers"]["mlp"]) * 4
  f32, i8, nf4, dq = (rows[("lora", q)] for q in ("none", "int8", "nf4", "nf4dq"))
  assert f32["frozen_bytes"] > i8["frozen_bytes"] > nf4["frozen_bytes"] > dq["frozen_bytes"]
  assert f32["frozen_bytes"] - nf4["frozen_bytes"] > 0.5 * kernels  # at least the MLP kernels shrank 8x
  # Double quantization: each block's float32 absmax becomes one int8 byte, plus a float32 per row of blocks and one
  # per layer, for every layer kernel [L, in, out].
  shapes = traverse_util.flatten_dict(models.param_shapes(rm_step.preset("tiny")), sep="/",
                                      is_leaf=lambda _, x: isinstance(x, tuple))
  layer_kernels = [s for p, s in shapes.items() if p.startswith("layers/") and p.endswith("kernel")]
  saved = sum(3 * l * (i // 16) * o - 4 * l * (i // 16) - 4 * l for l, i, o in layer_kernels)
  assert len(layer_kernels) == 7 and nf4["frozen_bytes"] - dq["frozen_bytes"] == saved
  assert f32["argument_bytes"] > i8["argument_bytes"] > nf4["argument_bytes"] > dq["argument_bytes"]
  table = capsys.readouterr().out
  assert "| tiny | lora+nf4 |" in table and "| tiny | lora+int8 | float32 |" in table
  assert "| tiny | lora+nf4dq |" in table
  with pytest.raises(flags.IllegalFlagValueError, match="--quant: comma-separated none, int8, nf4"):
    _cli().main(["--model", "tiny", "--abstract", "--quant", "fp4"])


def test_cli_microbatches_cut_the_rm_steps_activation_memory(tmp_path):
  """--microbatches 4: the same step over 4 accumulated microbatches; its temporaries (activations) shrink, its
  arguments do not, and the row is labelled and compared only with rows of the same accumulation."""
  import json
  out = tmp_path / "rows.jsonl"
  for m in ("1", "4"):
    assert _cli().main(["--model", "tiny", "--modes", "lora", "--abstract", "--dtype", "float32", "--batch", "8",
                        "--seq", "256", "--microbatches", m, "--out", str(out)]) == 0
  one, four = [json.loads(line) for line in out.read_text().splitlines()]
  assert (one["microbatches"], four["microbatches"]) == (1, 4)
  assert four["argument_bytes"] == one["argument_bytes"] and four["temp_bytes"] < 0.5 * one["temp_bytes"]
  from perl_jax.bench import rm_step
  assert rm_step.mode_label(four) == "lora (4 mb)" and rm_step.compare([one, four]) == []
