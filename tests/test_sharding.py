"""Sharded training is single-device training: 8 simulated CPU devices, data=8 and data=4 x fsdp=2, for
stage one, a deterministic round and the stochastic rounds at N = 1 and 2.

The device count is fixed when JAX initialises, so the checks run in subprocesses that run this file as a
script, and the tests read their JSON reports: `python tests/test_sharding.py OUT_DIR` with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (one process, 8 devices), then the same run as two
processes of 4 devices each (`... OUT_DIR PROCESS_ID PORT`, jax.distributed over localhost).
"""
import functools
import json
import os
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from distill import diffusion, parallel, schedules, testing, train
from distill.methods.guided import progressive
from distill.methods.guided import stage_one as guided

DEVICES = 8
SHAPE = (4, 4, 1)
NULL = 3
BATCH = 16
FSDP_MIN_SIZE = 1500  # shards the tiny model's [28, 64] and [64, 64] kernels, keeps the rest replicated
TOL = 1e-5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TinyNet(nn.Module):
  """An MLP v-prediction over the flattened image, with λ, w and a label one-hot; dropout, so the dropout
  draws over a sharded batch are exercised too."""
  hidden: int = 64

  @nn.compact
  def __call__(self, z, logsnr, labels, w, train=False):
    h = jnp.concatenate([z.reshape(z.shape[0], -1), jnp.sin(logsnr[:, None] / 20.0 * jnp.arange(1.0, 5.0)),
                         jnp.cos(w[:, None] / 4.0 * jnp.arange(1.0, 5.0)), jax.nn.one_hot(labels, NULL + 1)], -1)
    h = nn.swish(nn.Dense(self.hidden)(h))
    h = nn.Dropout(0.1, deterministic=not train)(h)
    h = nn.swish(nn.Dense(self.hidden)(h))
    return nn.Dense(int(np.prod(z.shape[1:])))(h).reshape(z.shape)


def tiny_x(params, z, logsnr, labels, w, *, train=False, rng=None):
  out = TinyNet().apply({"params": params}, z, logsnr, labels, w, train=train,
                        rngs={"dropout": rng} if train else None)
  return diffusion.x_from_output(out, z, logsnr, "v")


def tiny_params(seed):
  return TinyNet().init(jax.random.PRNGKey(seed), jnp.zeros((1,) + SHAPE), jnp.zeros(1), jnp.zeros(1, jnp.int32),
                        jnp.zeros(1))["params"]


def batch_fn(step, crash_at=None, rows=slice(None)):
  """{'image': float32 [16, 4, 4, 1], 'label': int32 [16]}, or its `rows`: a pure function of the step."""
  if step == crash_at:
    raise KeyboardInterrupt("simulated kill")
  rng = np.random.default_rng(step)
  return {"image": rng.uniform(-1, 1, (BATCH,) + SHAPE).astype(np.float32)[rows],
          "label": rng.integers(0, NULL, BATCH).astype(np.int32)[rows]}


@functools.lru_cache(maxsize=None)
def _losses():
  """Built once (after JAX initialises), so equal layouts reuse one compiled step."""
  logsnr = schedules.cosine_logsnr
  return {
      "stage_one": guided.stage_one_loss(tiny_x, tiny_x, logsnr_fn=logsnr, null_label=NULL, w_min=0.0, w_max=4.0,
                                         weighting="snr_plus_one"),
      "round": progressive.deterministic_round_loss(tiny_x, tiny_x, logsnr_fn=logsnr, w_min=0.0, w_max=4.0),
      "stochastic": progressive.stochastic_round_loss(tiny_x, tiny_x, logsnr_fn=logsnr, w_min=0.0, w_max=4.0),
  }


# kind -> (loss, the round's student step count N); stochastic N = 1 trains only i = 1 (the teacher's own x̂
# at t = 1, which the student, with dropout, is pulled back to), N = 2 both branches of Alg. 3.
KINDS = {"stage_one": ("stage_one", None), "round": ("round", 8), "stochastic_n1": ("stochastic", 1),
         "stochastic_n2": ("stochastic", 2)}


# Adam's first update is lr·g/(|g| + eps) ≈ lr·sign(g): with eps = 1e-8 a gradient entry that cancels to ~1e-6
# over the batch turns float reduction-order noise (which any change of device count brings) into an O(lr)
# difference (seen: one entry in 4096, 5e-5 relative). A larger eps keeps the update a smooth function of
# the gradient, so what is compared is the gradient the sharded step computes.
OPTIMIZER = optax.adam(1e-2, eps=1e-4)


def stage(kind, fsdp=1, num_steps=3, crash_at=None, rows=slice(None)):
  teacher = tiny_params(1)
  if kind == "stage_one":  # a fresh student, EMA, the teacher frozen
    init, frozen, ema = tiny_params(0), {"teacher": teacher}, 0.9
  else:  # as in pipeline.run_rounds: the student starts as its teacher, which it is also given frozen
    init, frozen, ema = teacher, {"teacher": teacher, "num_steps": jnp.int32(KINDS[kind][1])}, None
  return train.Stage(name=kind, loss_fn=_losses()[KINDS[kind][0]], init_params=init, optimizer=OPTIMIZER, num_steps=num_steps,
                     batch_fn=functools.partial(batch_fn, crash_at=crash_at, rows=rows), seed=5, ema_decay=ema,
                     frozen=frozen, log_every=1, ckpt_every=2, fsdp=fsdp, fsdp_min_size=FSDP_MIN_SIZE)


def rel(a, b, reduce=max):
  """max (or `reduce`) over leaves of ‖a − b‖∞ / ‖b‖∞."""
  return reduce(float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64))) / np.max(np.abs(y)))
             for _, x, y in testing.tree_leaf_pairs(parallel.to_host(a), parallel.to_host(b)))


def _worker(out_dir):
  """Runs in the 8-device subprocess; returns the report the tests check."""
  assert jax.device_count() == DEVICES, jax.devices()
  report = {"partitionable": bool(jax.config.jax_threefry_partitionable)}
  for kind in KINDS:
    one, _ = train.run_stage(stage(kind), os.path.join(out_dir, kind, "one"), devices=jax.devices()[:1])
    entry = {"moved": rel(stage(kind).init_params, one, min),
             "devices_one": len(jax.tree.leaves(one)[0].sharding.device_set)}
    for name, fsdp in (("data8", 1), ("data4_fsdp2", 2)):
      got, _ = train.run_stage(stage(kind, fsdp), os.path.join(out_dir, kind, name))
      entry[name] = rel(got, one)
      entry[f"specs_{name}"] = {jax.tree_util.keystr(k): str(v.sharding.spec) for k, v in
                                jax.tree_util.tree_flatten_with_path(got)[0]}
      entry[f"devices_{name}"] = len(jax.tree.leaves(got)[0].sharding.device_set)
    report[kind] = entry

  # Resume on 4 x 2 from a checkpoint restored with FSDP shardings; the stage-one kind has EMA and Adam state.
  ref, _ = train.run_stage(stage("stage_one", 2, num_steps=6), os.path.join(out_dir, "resume", "ref"))
  resumed_dir = os.path.join(out_dir, "resume", "b")
  try:
    train.run_stage(stage("stage_one", 2, num_steps=6, crash_at=5), resumed_dir)
  except KeyboardInterrupt:
    pass
  target, shardings = train.place_state(train.init_state(tiny_params(0), OPTIMIZER, with_ema=True),
                                        parallel.make_mesh(2), FSDP_MIN_SIZE)
  manager = train._manager(os.path.join(resumed_dir, "checkpoints"), 2)
  restored, _ = train.restore_checkpoint(manager, jax.tree.map(ocp.utils.to_shape_dtype_struct, target))
  resumed, _ = train.run_stage(stage("stage_one", 2, num_steps=6), resumed_dir)
  report["resume"] = {
      "checkpoint_steps": sorted(manager.all_steps()), "restored_step": int(restored["step"]),
      "restored_shardings_match": all(a.sharding == s for a, s in zip(jax.tree.leaves(restored),
                                                                       jax.tree.leaves(shardings))),
      "rel": rel(resumed, ref), "final_rel": rel(train.load_final_params(resumed_dir)[0], ref),
  }
  # The draw the loss makes over a sharded batch is the unsharded one, bit for bit.
  key = jax.random.fold_in(jax.random.PRNGKey(5), 2)
  draw = lambda k: jax.random.normal(k, (BATCH,) + SHAPE)
  sharded = jax.jit(draw, out_shardings=parallel.batch_sharding(parallel.make_mesh(2)))(key)
  report["rng_sharded_equal"] = bool(np.array_equal(sharded, jax.jit(draw)(key)))

  # Evaluation sampling splits each chunk over the devices and returns what one device returns.
  from distill import context, samplers
  from distill.testing import GaussianMixture
  gmm = GaussianMixture.random(0, num_classes=3, shape=(2, 2, 1))
  seen = []

  jitted = jax.jit(lambda z, labels, w: samplers.ddim_sample(
      samplers.guided_denoiser(gmm.model_fn, labels, w, gmm.num_classes), z, schedules.cosine_logsnr, 8).x)

  def sample(z, labels, w):
    seen.append(len(z.sharding.device_set))
    return jitted(z, labels, w)

  z = jax.random.normal(jax.random.PRNGKey(3), (37, 2, 2, 1))
  labels, w = jnp.arange(37) % 3, jnp.linspace(0.0, 4.0, 37)
  got = context.sample_in_chunks(sample, z, labels, w, 12)  # chunks of 16 rows: 2 per device
  one = np.concatenate([np.asarray(jitted(z[i:i + 1], labels[i:i + 1], w[i:i + 1])) for i in range(37)])
  report["sampling"] = {"devices": seen[0], "rel": rel(got, one)}
  return report


def _process_worker(out_dir, process_id, port):
  """One of two processes of 4 devices each (data=4 x fsdp=2 over both): each feeds its own 8 rows."""
  jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
  assert jax.device_count() == DEVICES and jax.local_device_count() == DEVICES // 2
  rows = slice(process_id * BATCH // 2, (process_id + 1) * BATCH // 2)
  stage_dir = os.path.join(out_dir, "two_processes")
  st = stage("stage_one", 2, rows=rows)
  params, _ = train.run_stage(st, stage_dir, is_main_process=process_id == 0)
  one, _ = train.load_final_params(os.path.join(out_dir, "stage_one", "one"))
  # The stage hands back host numpy (so process 0 can sample alone); its checkpoints restore as global arrays
  # spread over both processes' devices.
  mesh = parallel.make_mesh(st.fsdp)
  init = parallel.place(st.init_params, parallel.param_shardings(mesh, st.init_params, st.fsdp_min_size))
  state, _ = train.place_state(train.init_state(init, st.optimizer, st.ema_decay is not None), mesh, st.fsdp_min_size)
  restored, _ = train.restore_checkpoint(train._manager(os.path.join(stage_dir, "checkpoints"), 2),
                                         jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
  report = {"rel": rel(params, one), "numpy": all(isinstance(a, np.ndarray) for a in jax.tree.leaves(params)),
            "sharded": any(not a.is_fully_addressable and not a.is_fully_replicated for a in jax.tree.leaves(restored))}
  parallel.sync_processes("test: final written")
  report["final_rel"] = rel(train.load_final_params(stage_dir)[0], one)
  report["checkpoint_steps"] = sorted(int(d) for d in os.listdir(os.path.join(stage_dir, "checkpoints")) if d.isdigit())
  return report


def _env(devices):
  # XLA's lowest CPU backend optimisation compiles ~2x faster; the test compares layouts, not speed.
  flags = (f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices} "
           "--xla_backend_optimization_level=0")
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags.strip())


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  """The 8-device subprocess's report; then two 4-device processes of one run (out_dir/'two_processes')."""
  out = tmp_path_factory.mktemp("sharding")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out)], cwd=ROOT, env=_env(DEVICES),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])

  with socket.socket() as s:  # a free port for the coordinator
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(out), str(i), str(port)], cwd=ROOT,
                            env=_env(DEVICES // 2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    outs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:  # one that failed leaves the other waiting for it
      p.kill()
  for p, (stdout, stderr) in zip(procs, outs):
    assert p.returncode == 0, stderr[-4000:]
  result["two_processes"] = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outs]
  return result


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("layout", ["data8", "data4_fsdp2"])
def test_eight_devices_train_what_one_device_trains(report, kind, layout):
  r = report[kind]
  assert r["devices_one"] == 1 and r[f"devices_{layout}"] == DEVICES
  assert r["moved"] > 1e-2, r  # three updates moved every parameter: the comparison is not vacuous
  assert r[layout] <= TOL, r


def test_fsdp_shards_large_leaves_along_their_largest_dimension(report):
  for kind in KINDS:
    assert set(report[kind]["specs_data8"].values()) == {str(P())}
    specs = report[kind]["specs_data4_fsdp2"]
    assert specs["['Dense_0']['kernel']"] == str(P(None, "fsdp"))  # [28, 64]
    assert specs["['Dense_1']['kernel']"] == str(P(None, "fsdp"))  # [64, 64]: ties go to the later axis
    assert specs["['Dense_2']['kernel']"] == str(P())  # [64, 16]: under fsdp_min_size
    assert specs["['Dense_1']['bias']"] == str(P())


def test_sharded_run_resumes_bit_identically(report):
  r = report["resume"]
  assert r["checkpoint_steps"] == [2, 4] and r["restored_step"] == 4, r
  assert r["restored_shardings_match"], r
  assert r["rel"] == 0.0 and r["final_rel"] == 0.0, r


def test_two_processes_train_what_one_device_trains(report):
  for r in report["two_processes"]:  # each process sees the same global parameters
    assert r["numpy"] and r["sharded"] and r["rel"] <= TOL and r["final_rel"] <= TOL, r
    assert r["checkpoint_steps"] == [2], r


def test_evaluation_sampling_is_split_over_the_devices(report):
  assert report["sampling"]["devices"] == DEVICES and report["sampling"]["rel"] <= TOL, report["sampling"]


def test_random_draws_do_not_depend_on_the_layout(report):
  assert report["partitionable"] and report["rng_sharded_equal"]


def test_fsdp_spec_rule():
  assert parallel.fsdp_spec((3, 3, 64, 128), 4, 1) == P(None, None, None, "fsdp")
  assert parallel.fsdp_spec((128, 6), 4, 1) == P("fsdp")
  assert parallel.fsdp_spec((6, 10), 4, 1) == P()  # nothing divisible
  assert parallel.fsdp_spec((128, 128), 4, 10**6) == P()  # too small
  assert parallel.fsdp_spec((), 4, 0) == P()
  assert parallel.fsdp_spec((128, 128), 1, 1) == P()


def test_mesh_rejects_an_fsdp_that_does_not_divide_the_devices():
  with pytest.raises(parallel.ShardingError, match="fsdp=3"):
    parallel.make_mesh(3, jax.devices()[:1])
  assert dict(parallel.make_mesh(1).shape) == {"data": jax.device_count(), "fsdp": 1}


if __name__ == "__main__":
  if len(sys.argv) == 2:
    print(json.dumps(_worker(sys.argv[1])))
  else:
    print(json.dumps(_process_worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
