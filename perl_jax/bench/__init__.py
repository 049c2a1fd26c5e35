"""The measurement wing: step time, memory and MFU of the RM step (`rm_step`) and the RL step (`rl_step`), and our
RM step against PyTorch + PEFT on the same batch (`torch_compare`). Nothing in training imports it; its CLI is
scripts/benchmark.py."""
