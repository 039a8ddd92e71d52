"""One outer iteration of trajectory matching: JAX (this library) vs PyTorch (MTT-style), side by side.

  python bench/meta_grad.py [--width 128 --images 100 --syn_steps 10 --repeats 2]

The computation: ConvNet-3 (instance norm, avg-pool) on 32x32x3, a student taking `syn_steps` SGD
steps on minibatches of the synthetic images from expert parameters, the normalised parameter
distance to a target, and its gradient w.r.t. the images and the lr. DSA is off in both so the
programs compute the same function. PyTorch follows MTT: flat parameters, `create_graph=True`.
Each measurement runs in its own process; peak memory is the rise of the process's peak RSS
(VmHWM) during the first execution, which runs after JAX's compilation and before any allocator
reuse, so neither framework's caching hides memory; XLA's own buffer plan is printed beside it.
Compile time (JAX) is reported separately.

The last line is `time_ratio=<jax/torch> mem_ratio=<jax/torch> mem_80_over_10=<x>`.
"""

import argparse
import json
import os
import subprocess
import sys
import time


def _rss_mb(field):
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field):
        return int(line.split()[1]) / 1024.0
  return float("nan")


def _reset_peak():
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    pass


def _timed(fn, repeats, prepare_s=0.0):
  """Peak memory of the first execution (after any compilation, before any allocator reuse),
  then the best of `repeats` timed executions."""
  _reset_peak()
  base = _rss_mb("VmRSS")
  t = time.perf_counter()
  fn()
  first = time.perf_counter() - t
  peak = _rss_mb("VmHWM") - base
  times = [first]
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return {"compile_s": prepare_s, "first_call_s": first, "run_s": min(times), "peak_mb": peak}


def worker_jax(args):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from ltdd_jax import models  # pylint: disable=g-import-not-at-top
  from ltdd_jax.core import ensemble, matching  # pylint: disable=g-import-not-at-top
  model = models.make_classifier(models.ModelSpec(width=args.width, depth=3), 10)
  spec = matching.InnerSpec(syn_steps=args.syn_steps, batch_syn=args.batch_syn,
                            remat=args.remat_policy != "none",
                            remat_policy=("nothing_saveable" if args.remat_policy == "none"
                                          else args.remat_policy))
  student = matching.Student(ensemble.make_apply(model), spec)
  start = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  target = jax.tree.map(lambda p: p + 0.01, start)
  images = jax.random.normal(jax.random.key(1), (args.images, 32, 32, 3))
  labels = jnp.arange(args.images) % 10
  grad = jax.jit(jax.grad(lambda x, lr: matching.trajectory_matching_loss(
      student, {"images": x, "targets": labels, "lr": lr}, {"start": start, "target": target},
      jax.random.key(2)),
      argnums=(0, 1)))
  lr = jnp.float32(0.01)
  t = time.perf_counter()
  compiled = grad.lower(images, lr).compile()
  compile_s = time.perf_counter() - t
  result = _timed(lambda: jax.block_until_ready(compiled(images, lr)), args.repeats, compile_s)
  analysis = compiled.memory_analysis()
  if analysis is not None:
    result["xla_temp_mb"] = analysis.temp_size_in_bytes / 2**20
  if jax.default_backend() != "cpu":  # Accelerator memory, not host RSS.
    stats = jax.devices()[0].memory_stats() or {}
    result["peak_mb"] = stats.get("peak_bytes_in_use", float("nan")) / 2**20
  return result


def worker_torch(args):
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  w = args.width
  shapes = [(w, 3, 3, 3), (w,), (w,), (w,), (w, w, 3, 3), (w,), (w,), (w,), (w, w, 3, 3), (w,),
            (w,), (w,), (10, w * 16), (10,)]
  flat_start = torch.cat([torch.randn(s).flatten() * 0.05 for s in shapes])
  target = flat_start + 0.01
  sizes = [int(torch.tensor(s).prod()) for s in shapes]

  def forward(flat, x):
    ps = [p.view(s) for p, s in zip(torch.split(flat, sizes), shapes)]
    for i in range(3):
      kernel, bias, scale, shift = ps[4 * i:4 * i + 4]
      x = F.conv2d(x, kernel, bias, padding=1)
      x = F.group_norm(x, w, scale, shift)
      x = F.avg_pool2d(F.relu(x), 2)
    return F.linear(x.flatten(1), ps[12], ps[13])

  images = torch.randn(args.images, 3, 32, 32, requires_grad=True)
  labels = torch.arange(args.images) % 10
  lr = torch.tensor(0.01, requires_grad=True)

  def step():
    student = [flat_start.clone().requires_grad_(True)]
    for _ in range(args.syn_steps):
      idx = torch.randperm(args.images)[:args.batch_syn]
      ce = F.cross_entropy(forward(student[-1], images[idx]), labels[idx])
      g = torch.autograd.grad(ce, student[-1], create_graph=True)[0]
      student.append(student[-1] - lr * g)
    loss = ((student[-1] - target) ** 2).sum() / ((flat_start - target) ** 2).sum()
    gi, gl = torch.autograd.grad(loss, [images, lr])
    return gi, gl

  torch.set_num_threads(os.cpu_count())
  return _timed(step, args.repeats)


def run_worker(framework, syn_steps, args):
  cmd = [sys.executable, __file__, "--worker", framework, "--syn_steps", str(syn_steps),
         "--width", str(args.width), "--images", str(args.images), "--batch_syn",
         str(args.batch_syn), "--repeats", str(args.repeats), "--remat_policy", args.remat_policy]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"{framework} worker failed:\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--worker", choices=["jax", "torch"])
  parser.add_argument("--width", type=int, default=128)
  parser.add_argument("--images", type=int, default=100)
  parser.add_argument("--batch_syn", type=int, default=100)
  parser.add_argument("--syn_steps", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--memory_steps", default="10,20,40,80")
  parser.add_argument("--skip_torch", action="store_true")
  parser.add_argument("--remat_policy", default="nothing_saveable",
                      help="a jax.checkpoint_policies name, or none (no rematerialisation)")
  args = parser.parse_args()
  if args.worker:
    fn = worker_jax if args.worker == "jax" else worker_torch
    print(json.dumps(fn(args)))
    return
  print(f"ConvNet-3 width {args.width}, {args.images} synthetic 32x32x3 images, batch_syn "
        f"{args.batch_syn}, syn_steps {args.syn_steps}, cpu_count {os.cpu_count()}")
  jax_r = run_worker("jax", args.syn_steps, args)
  print(f"jax   compile {jax_r['compile_s']:.2f}s run {jax_r['run_s']:.2f}s "
        f"peak +{jax_r['peak_mb']:.0f} MB (XLA temp buffers {jax_r.get('xla_temp_mb', 0):.0f} MB)")
  if args.skip_torch:
    torch_r = {"run_s": float("nan"), "peak_mb": float("nan")}
  else:
    torch_r = run_worker("torch", args.syn_steps, args)
    print(f"torch first call {torch_r['first_call_s']:.2f}s run {torch_r['run_s']:.2f}s "
          f"peak +{torch_r['peak_mb']:.0f} MB")
  mems = {}
  for steps in [int(s) for s in args.memory_steps.split(",")]:
    r = jax_r if steps == args.syn_steps else run_worker("jax", steps, args)
    mems[steps] = r["peak_mb"]
    print(f"jax syn_steps {steps:3d}: run {r['run_s']:.2f}s peak +{r['peak_mb']:.0f} MB "
          f"(XLA temp buffers {r.get('xla_temp_mb', 0):.0f} MB)")
  lo, hi = min(mems), max(mems)
  print(f"time_ratio={jax_r['run_s'] / torch_r['run_s']:.3f} "
        f"mem_ratio={jax_r['peak_mb'] / torch_r['peak_mb']:.3f} "
        f"mem_{hi}_over_{lo}={mems[hi] / mems[lo]:.3f}")


if __name__ == "__main__":
  main()
