"""The memory planner against hand arithmetic for DeepSeek-V3."""

import pytest

import deepjax as dj
from deepjax import accounting
from deepjax.memory_plan import plan

V3 = dj.ModelConfig.preset("v3")
EXPERT_PARAMS = 3 * 7168 * 2048                   # one routed expert: gate, up, down
MOE_LAYERS = 61 - 3 + 1                           # 58 MoE layers + the MTP block


def _all_params():
  counts = accounting.param_counts(V3)
  return counts.total + counts.mtp


@pytest.mark.parametrize("fsdp, expert, devices", [(32, 64, 2048), (16, 8, 128)])
def test_v3_parameter_shards(fsdp, expert, devices):
  p = plan(V3, {"data": -1, "fsdp": fsdp, "expert": expert, "tensor": 1}, devices,
           batch_size=devices * 2, seq_len=4096)
  # Routed experts and router columns split over expert x fsdp (expert axis, hidden dim);
  # everything else over fsdp.
  by_expert = MOE_LAYERS * 256 * (EXPERT_PARAMS + 7168)
  other = _all_params() - by_expert
  expected = 2 * (by_expert // (expert * fsdp) + other // fsdp)      # bf16
  assert p.params_bytes == pytest.approx(expected, rel=1e-5)
  assert p.grads_bytes == p.params_bytes and p.optimizer_bytes == 2 * p.params_bytes


def test_v3_all_to_all_and_flops():
  devices, expert = 2048, 64
  p = plan(V3, {"data": 1, "fsdp": -1, "expert": expert, "tensor": 1}, devices,
           batch_size=4096, seq_len=4096)
  tokens = 4096 * 4096 // devices
  assert p.tokens_per_device == tokens
  # Dropless: each device's send buffer holds, for each of the 64 peers, room for all its
  # top-8 copies of 7168 bf16 values; dispatch + combine, forward + backward.
  per_layer = 4 * expert * tokens * 8 * 7168 * 2 * (expert - 1) // expert
  assert p.all_to_all_bytes == pytest.approx(MOE_LAYERS * per_layer, rel=1e-6)
  # Capacity factor 1.25: 1.25x the copies' fair share per peer.
  capped = plan(V3.replace(moe_capacity_factor=1.25),
                {"data": 1, "fsdp": -1, "expert": expert, "tensor": 1}, devices,
                batch_size=4096, seq_len=4096)
  per_layer = 4 * (tokens * 8 * 5 // 4) * 7168 * 2 * (expert - 1) // expert
  assert capped.all_to_all_bytes == pytest.approx(MOE_LAYERS * per_layer, rel=1e-6)
  assert p.flops_per_step == pytest.approx(accounting.flops_per_token(V3, 4096) * 4096 * 4096)


@pytest.mark.parametrize("sizes, devices, batch, message", [
    ({"data": -1, "expert": 3}, 6, 6, "n_routed_experts 256 is not divisible by the expert axis"),
    ({"data": -1, "expert": 8}, 64, 100, "batch_size 100 is not divisible"),
    ({"data": 3, "expert": 8}, 64, 96, "do not divide the 64 devices"),
])
def test_clear_errors(sizes, devices, batch, message):
  with pytest.raises(ValueError, match=message):
    plan(V3, sizes, devices, batch_size=batch, seq_len=4096)
