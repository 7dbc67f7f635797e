"""experiments/benchmarks: the CPU benchmarks run end to end at a toy size and print their
tables (the numbers themselves are measured by running them in full, never asserted here)."""

import os
import subprocess
import sys
import types

import jax
import pytest

import kernel_bench  # experiments/benchmarks, on sys.path by conftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "experiments", "benchmarks")


def run_benchmark(name: str, *flags: str) -> str:
  proc = subprocess.run([sys.executable, os.path.join(BENCHMARKS, name), *flags],
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return proc.stdout


def table_rows(output: str, title: str) -> list[list[str]]:
  """The body rows of the markdown table under the '### {title}...' heading."""
  lines = output.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(f"### {title}"))
  rows = []
  for line in lines[start + 4:]:        # heading, blank, header, separator
    if not line.startswith("|"):
      break
    rows.append([cell.strip() for cell in line.strip("|").split("|")])
  return rows


@pytest.mark.slow
def test_train_throughput_prints_every_system_and_the_matmul_rates():
  out = run_benchmark("train_throughput.py", "--batch_size=2", "--seq_len=32", "--warmup=0",
                      "--steps=1", "--rounds=1", "--hf_experts=eager", "--bf16_row",
                      "--profile")
  steps = {row[0]: row for row in table_rows(out, "Train step throughput")}
  assert set(steps) == {"deepjax (moe_impl=blocked)", "deepjax (moe_impl=blocked, no MTP)",
                        "deepjax (moe_impl=blocked, compute bfloat16)",
                        "transformers (experts=eager)"}
  for row in steps.values():
    assert float(row[1]) > 0 and row[6].endswith("%")
  assert steps["transformers (experts=eager)"][4] == "1.00x"
  # MTP adds FLOPs per token; without it deepjax counts what transformers' model computes.
  assert float(steps["deepjax (moe_impl=blocked)"][5]) > float(
      steps["deepjax (moe_impl=blocked, no MTP)"][5]) == float(
          steps["transformers (experts=eager)"][5])
  rates = table_rows(out, "float32 matmul rate")
  assert [row[0].split(" [")[0] for row in rates] == ["peak shape", "token projection",
                                                      "blocked experts"]
  for row in rates:
    assert float(row[1]) > 0 and float(row[3]) > 0 and row[4].endswith("x")
  # --profile: op time by kind, matmuls among them, and the costliest ops traced to jax ops.
  kinds = {row[0]: float(row[1]) for row in table_rows(out, "Op time of one deepjax step")}
  assert kinds["matmul"] > 0
  costliest = table_rows(out, "Costliest ops of one deepjax step")
  assert costliest and all(row[2].startswith("jit(step)") or row[2] == "(made by XLA, no jax op)"
                           for row in costliest)
  assert any(row[2].startswith("jit(step)") for row in costliest)


@pytest.mark.slow
def test_train_throughput_loop_mode_times_the_loop_and_its_step():
  # batch 8: the loop spreads it over all devices, 8 simulated ones here (conftest)
  out = run_benchmark("train_throughput.py", "--loop", "--batch_size=8", "--seq_len=16",
                      "--loop_steps=3", "--log_every=2")
  rows = {row[0]: row for row in table_rows(out, "Training loop against its step")}
  assert list(rows) == ["deepjax.train.loop.train", "its jitted step alone"]
  assert all(float(row[1]) > 0 for row in rows.values())
  assert rows["its jitted step alone"][3] == "100%"


@pytest.mark.slow
def test_decode_throughput_runs_both_systems():
  out = run_benchmark("decode_throughput.py", "--batch=2", "--prompt_len=8",
                      "--new_tokens=4", "--repeats=1")
  rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
          for line in out.splitlines() if line.startswith("| ") and "implementation" not in line}
  assert list(rows) == ["transformers (torch, eager attention, KV cache)",
                        "deepjax (latent cache, absorbed MLA, one jit)", "deepjax, MTP speculative"]
  # Greedy decoding of the same weights: deepjax picks transformers' tokens, speculation too.
  assert all(row[5] == "100%" for row in rows.values()), rows


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_kernel_check_on_cpu(tmp_path):
  """The prepared GPU script in its CPU form: interpret mode, tiny shapes, every correctness
  check passing (its exit status) and every throughput table printed."""
  proc = subprocess.run(["bash", os.path.join(BENCHMARKS, "gpu_check.sh"), "--smoke"],
                        env=dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable),
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = (tmp_path / "kernel_bench.md").read_text()
  assert "interpret=True" in report
  for title in ("Measured ceilings", "Correctness against the pure-jnp references (interpret)",
                "MLA attention, causal", "MLA absorbed decode", "Grouped matmul",
                "DeepSeek Sparse Attention", "Lightning indexer",
                "Sweep: MLA attention blocks", "Sweep: MLA decode blocks", "Sweep: gmm / tgmm"):
    assert f"### {title}" in report, (title, report[-2000:])
  assert "failed" not in report, report[-3000:]
  for kernel in ("attention (fwd+bwd)", "decode", "gmm (2 gmm + 1 tgmm"):
    assert f"Fastest {kernel}" in report, kernel


@pytest.mark.slow
def test_kernel_bench_smoke_times_sparse_attention_and_the_indexer_against_dense():
  """The DSA tables alone (--skip the others), interpreted at toy shapes: every model's row,
  the dense comparisons measured (they fit), a verdict per row."""
  out = run_benchmark("kernel_bench.py", "--smoke", "--skip=correctness,decode,gmm,attention")
  assert "failed" not in out, out[-3000:]
  sparse = table_rows(out, "DeepSeek Sparse Attention")
  assert [row[0].split(" ")[0] for row in sparse] == ["V3.2", "V4-Flash"]
  for row in sparse:
    assert all(float(x) > 0 for x in row[2:10]), row
    assert row[10] in {f"fwd {a}, fwd+bwd {b}" for a in ("met", "unmet") for b in ("met", "unmet")}
  indexer = table_rows(out, "Lightning indexer")
  assert [row[1] for row in indexer] == ["B=1 T=64 S=64", "B=1 T=64 S=16"]
  for row in indexer:
    assert all(float(x) > 0 for x in row[2:7]) and row[7] in ("met", "unmet"), row


@pytest.mark.slow
def test_sparse_scaling_smoke_prints_both_tables():
  out = run_benchmark("sparse_scaling.py", "--smoke")
  rows = table_rows(out, "Sparse (K=32) against dense causal attention")
  assert [row[0] for row in rows] == ["128", "256"]
  assert all(float(x) > 0 for row in rows for x in row[1:])
  growth = table_rows(out, "Time growth per step of T")
  assert len(growth) == 1 and all(float(x) > 0 for x in growth[0][1:])


@pytest.mark.slow
def test_optimizer_compare_smoke_trains_both_optimizers():
  out = run_benchmark("optimizer_compare.py", "--smoke")
  rows = [line.strip("|").split("|") for line in out.splitlines()
          if line.startswith("| adamw") or line.startswith("| muon")]
  assert [row[0].strip() for row in rows] == ["adamw", "muon"]
  adamw, muon = ({"steps": int(r[1]), "state": float(r[6])} for r in rows)
  assert adamw["steps"] == muon["steps"] == 4
  # Muon keeps one moment per matrix where AdamW keeps two.
  assert muon["state"] < 0.75 * adamw["state"]


def test_sparse_indices_are_causal_with_the_window_first():
  """Queries that see at most K keys take them all, latest first; later ones their window of
  latest keys, then earlier visible ones."""
  idx = kernel_bench.sparse_indices(jax.random.key(0), 2, 40, 8, window=3)
  assert idx.shape == (2, 40, 8) and idx.dtype == jax.numpy.int32
  assert idx[0, 2].tolist() == [2, 1, 0, -1, -1, -1, -1, -1]
  assert idx[1, 7].tolist() == list(range(7, -1, -1))
  assert (idx[:, 20, :3] == jax.numpy.array([20, 19, 18])).all()
  pos = jax.numpy.arange(40)[None, :, None]
  assert ((idx[:, 8:, 3:] >= 0) & (idx[:, 8:, 3:] <= pos[:, 8:] - 3)).all()


def test_jax_mosaic_gpu_references_lower_for_cuda(monkeypatch):
  """gpu_check times JAX's own Mosaic GPU kernels beside ours: their calls must be right
  before device time is spent on them. FA3 reads the CUDA runtime's version and the
  transposed ragged dot the GPU's core count while tracing; both are stubbed with an H200's
  (CUDA 13, 132 SMs) for the trace, then lowered for CUDA."""
  lhs, rhs, grad, sizes, _ = kernel_bench._gmm_operands(512, 256, 256, 4)
  gmm_cases = kernel_bench._gpu_gmm_candidates(lhs, rhs, grad, sizes)
  fa3 = kernel_bench._optional_module("jax.experimental.pallas.ops.gpu.attention_mgpu")
  monkeypatch.setattr(fa3, "cuda_versions", types.SimpleNamespace(
      cuda_runtime_get_version=lambda: 13000))
  (q, k, v), _, _ = kernel_bench._attention_operands(1, 256, 2)
  attention_cases = kernel_bench._gpu_attention_candidates()
  fa3_forward, has_backward = attention_cases[
      "JAX's Mosaic GPU FA3 example (float16, v padded to 192)"]
  assert not has_backward
  traced = [jax.jit(fa3_forward).trace(q, k, v)]
  with monkeypatch.context() as patch:
    patch.setattr(jax, "devices", lambda *_: [types.SimpleNamespace(core_count=132)])
    traced += [fn.trace(*args) for fn, args in gmm_cases.values()]
  assert len(traced) == 3
  for trace in traced:
    assert "mosaic_gpu" in trace.lower(lowering_platforms=("cuda",)).as_text()


def test_sweep_summary_names_the_fastest_config_and_skips_failures(capsys):
  fastest = kernel_bench.fastest
  fastest("decode", ["default", "a", "b", "c"], [2.0, None, 0.5, 1.0])
  assert capsys.readouterr().out.strip() == "Fastest decode: 'b' (4.00x the default)"
  fastest("gmm", ["default", "a"], [None, 3.0])
  assert capsys.readouterr().out.strip() == "Fastest gmm: 'a' (the default failed)"
  fastest("gmm", ["default"], [None])
  assert capsys.readouterr().out.strip() == "Fastest gmm: none ran"


def test_gmm_rows_multiplied_counts_group_relative_and_aligned_tiles():
  """Sizes [3, 3, 0, 3] in 4-row tiles: one tile per group from its first row (12 rows), or
  the aligned tiles each group touches, 0 | 0, 1 | 1, 2 (20 rows)."""
  assert kernel_bench.gmm_rows_multiplied([3, 3, 0, 3], 4) == (12, 20)
  assert kernel_bench.gmm_rows_multiplied([8, 0, 4], 4) == (12, 12)   # aligned groups: equal
  assert kernel_bench.gmm_rows_multiplied([0, 0], 4) == (0, 0)


def test_decode_roofline_is_compute_bound_at_128_heads_on_an_h200():
  """The decode target is judged against the roofline, not the copy bandwidth alone: with
  128 heads each 1152-byte cache entry costs 128 * 2 * (2 * 512 + 64) FLOPs, 242 FLOP/B, past
  the ridge of the H200's measured ceilings (2026-12-04: XLA's 677 TFLOP/s bf16 matmul,
  4.13 TB/s copy), so at that matmul rate the cache streams at most at 677e12 / 242 B/s.
  V2-Lite's 16 heads are memory-bound."""
  roofline = kernel_bench.decode_roofline
  peak, bandwidth = 677e12, 4.13e12
  attainable, bound = roofline(64, 4096, 128, peak, bandwidth)
  assert bound == "compute-bound at 242 FLOP/B"
  assert attainable == pytest.approx(peak * 1152 / (128 * 2 * 1088))
  assert 0.67 < attainable / bandwidth < 0.69      # the 80% is above the roofline
  attainable, bound = roofline(64, 16384, 16, peak, bandwidth)
  assert attainable == pytest.approx(bandwidth) and bound == "memory-bound at 30 FLOP/B"


def test_gpu_sweep_configs_are_distinct_triton_configs_with_the_default_first():
  """gpu_check.sh's sweeps spend device time: every config must be a legal Triton tiling
  (power-of-two blocks of at least 16) and none may repeat."""
  attention, decode, gmm = kernel_bench.sweep_configs("gpu")
  assert attention[0] == kernel_bench.AttentionBlockSizes.get_default("gpu")
  assert decode[0] == kernel_bench.DecodeBlockSizes.get_default("gpu")
  assert gmm[0] == kernel_bench.GmmBlockSizes.get_default("gpu")
  blocks = [(c.block_q, c.block_k, c.block_q_bwd, c.block_k_bwd) for c in attention]
  blocks += [(c.block_s, c.block_h) for c in decode]
  blocks += [(c.block_m, c.block_k, c.block_n) for c in gmm]
  for sizes in blocks:
    assert all(b >= 16 and b & (b - 1) == 0 for b in sizes), sizes
  for configs in (attention, decode, gmm):
    assert len(set(configs)) == len(configs), configs


def test_shape_flags_parse_and_refuse_malformed_shapes():
  """--attention_shapes and friends: 'BxTxH,...' per kernel ('BxT' for the sparse attention and
  indexer tables, whose model shapes are fixed); a malformed one is refused by name
  before any device time is spent."""
  assert kernel_bench._shapes("4x4096x128,1x16384x16", 3) == [(4, 4096, 128), (1, 16384, 16)]
  assert kernel_bench._shapes("", 4) == []
  assert kernel_bench._shapes("1x8192,1x131072", 2) == [(1, 8192), (1, 131072)]  # sparse, indexer
  with pytest.raises(SystemExit, match="4 whole numbers joined by 'x', got '1x2x3'"):
    kernel_bench._shapes("1x2x3", 4)
  with pytest.raises(SystemExit, match="got '4xTx2'"):
    kernel_bench._shapes("4xTx2", 3)


def test_decode_sweep_times_each_distinct_tiling_once():
  """At 16 heads, block_h 16, 32 and 64 are the same program: the sweep times it once (the
  default first); at 128 heads every config is distinct."""
  decode = kernel_bench.sweep_configs("gpu")[1]
  assert kernel_bench.distinct_decode_tilings(decode, 128) == decode
  sixteen = kernel_bench.distinct_decode_tilings(decode, 16)
  assert sixteen[0] == decode[0] and len(sixteen) == 5
  assert len({(bs.block_s, bs.min_programs, bs.num_warps) for bs in sixteen}) == 5
