"""Expert parallelism (shard_map + all-to-all) against every expert on one device: outputs and
gradients on several meshes, the capacity factor's drops, and the errors it raises."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from deepjax.parallel import expert_parallel, make_mesh

N, K, E, H, I = 64, 3, 8, 12, 8


def _problem(seed=0, skew=False):
  rng = np.random.default_rng(seed)
  # skew: most copies go to experts 0-1 (one device on a 4-wide expert axis), to fill its slots.
  p = np.r_[[8.0, 8.0], np.ones(E - 2)] if skew else np.ones(E)
  experts = np.stack([rng.choice(E, K, replace=False, p=p / p.sum()) for _ in range(N)])
  return dict(
      x=jnp.asarray(rng.standard_normal((N, H)), jnp.float32),
      weights=jnp.asarray(rng.uniform(0.1, 1.0, (N, K)), jnp.float32),
      experts=jnp.asarray(experts, jnp.int32),
      ws=[jnp.asarray(0.3 * rng.standard_normal(s), jnp.float32)
          for s in ((E, H, I), (E, H, I), (E, I, H))],
      cotangent=jnp.asarray(rng.standard_normal((N, H)), jnp.float32))


def _every_expert(x, weights, experts, w_gate, w_up, w_down, kept):
  """sum_k g_k FFN_{e_k}(x) with all experts on every token; `kept` [N, K] masks copies."""
  h = jax.nn.silu(jnp.einsum("nd,edi->nei", x, w_gate)) * jnp.einsum("nd,edi->nei", x, w_up)
  y = jnp.einsum("nei,eid->ned", h, w_down)
  gates = jnp.zeros((N, E)).at[jnp.arange(N)[:, None], experts].add(weights * kept)
  return jnp.einsum("ned,ne->nd", y, gates)


def _value_and_grads(fn, p):
  loss = lambda x, w, *ws: jnp.vdot(fn(x, w, p["experts"], *ws), p["cotangent"])  # noqa: E731
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))(p["x"], p["weights"], *p["ws"])


def _expert_parallel(mesh_sizes, p, capacity_factor=None, gmm=pk.reference.gmm):
  mesh = make_mesh(mesh_sizes, devices=jax.devices()[:int(np.prod(list(mesh_sizes.values())))])

  def fn(x, w, e, *ws):
    return expert_parallel.routed_experts(x, w, e, *ws, mesh=jax.sharding.get_abstract_mesh(),
                                          gmm=gmm, capacity_factor=capacity_factor,
                                          check_vma=gmm is not pk.gmm)[0]

  with jax.set_mesh(mesh):
    return _value_and_grads(fn, p)


@pytest.mark.parametrize("mesh_sizes, gmm", [
    ({"expert": 8}, pk.reference.gmm),
    ({"data": 2, "expert": 4}, pk.reference.gmm),
    ({"fsdp": 2, "expert": 2, "tensor": 2}, pk.reference.gmm),  # FFN's intermediate dim on tensor
    ({"data": 2, "fsdp": 2, "expert": 2}, pk.reference.gmm),
    ({"data": 2, "expert": 4}, pk.gmm),                          # moe_impl="pallas" (interpret)
], ids=["expert8", "data2xexpert4", "fsdp2xexpert2xtensor2", "data2xfsdp2xexpert2",
        "data2xexpert4_pallas"])
def test_dropless_matches_every_expert_on_one_device(mesh_sizes, gmm):
  p = _problem(seed=len(mesh_sizes))
  want_value, want_grads = _value_and_grads(
      lambda *a: _every_expert(*a, kept=jnp.ones((N, K))), p)
  with jax.default_matmul_precision("highest"):
    value, grads = _expert_parallel(mesh_sizes, p, gmm=gmm)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  for name, got, want in zip(("x", "gates", "w_gate", "w_up", "w_down"), grads, want_grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)


def _kept_copies(experts, devices, shards, slots):
  """Which copies survive a capacity of `slots` per (sender, destination device): the first
  ones in token order, tokens split into `shards` contiguous groups (one per sender)."""
  flat = np.asarray(experts).reshape(shards, -1)
  kept = np.zeros_like(flat, dtype=bool)
  for s in range(shards):
    seen = np.zeros(devices, int)
    for j, e in enumerate(flat[s]):
      d = e // (E // devices)
      kept[s, j] = seen[d] < slots
      seen[d] += 1
  return kept.reshape(N, K)


def test_capacity_factor_drops_the_late_copies_and_counts_them():
  p = _problem(seed=3, skew=True)
  mesh_sizes, devices, capacity_factor = {"data": 2, "expert": 4}, 4, 1.0
  slots = expert_parallel.slots_per_device(N * K // 8, devices, capacity_factor)
  kept = _kept_copies(p["experts"], devices, shards=8, slots=slots)
  assert 0 < (~kept).sum() < N * K // 2          # the skew overflows some slots, not most
  want_value, want_grads = _value_and_grads(
      lambda *a: _every_expert(*a, kept=jnp.asarray(kept, jnp.float32)), p)
  mesh = make_mesh(mesh_sizes, devices=jax.devices()[:8])
  with jax.set_mesh(mesh), jax.default_matmul_precision("highest"):
    y, dropped = jax.jit(lambda x, w, e, *ws: expert_parallel.routed_experts(
        x, w, e, *ws, mesh=jax.sharding.get_abstract_mesh(), gmm=pk.reference.gmm,
        capacity_factor=capacity_factor))(p["x"], p["weights"], p["experts"], *p["ws"])
    value, grads = _expert_parallel(mesh_sizes, p, capacity_factor)
  assert int(dropped) == (~kept).sum()
  np.testing.assert_allclose(y, _every_expert(p["x"], p["weights"], p["experts"], *p["ws"],
                                              kept=jnp.asarray(kept, jnp.float32)),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  for got, want in zip(grads, want_grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_slots_per_device():
  assert expert_parallel.slots_per_device(96, 4, None) == 96        # dropless: worst case
  assert expert_parallel.slots_per_device(96, 4, 1.0) == 24         # the fair share
  assert expert_parallel.slots_per_device(96, 4, 1.25) == 30
  assert expert_parallel.slots_per_device(96, 4, 8.0) == 96         # never above dropless


def test_errors_name_the_problem():
  p = _problem()
  mesh = make_mesh({"expert": 8}, devices=jax.devices()[:8])
  with jax.set_mesh(mesh):
    abstract = jax.sharding.get_abstract_mesh()
    with pytest.raises(ValueError, match="not divisible by the expert axis"):
      expert_parallel.routed_experts(p["x"], p["weights"], p["experts"] % 4,
                                     *(w[:4] for w in p["ws"]), mesh=abstract,
                                     gmm=pk.reference.gmm)
    with pytest.raises(ValueError, match="tokens 60 is not divisible by the data-parallel size 8"):
      expert_parallel.routed_experts(p["x"][:60], p["weights"][:60], p["experts"][:60],
                                     *p["ws"], mesh=abstract, gmm=pk.reference.gmm)
