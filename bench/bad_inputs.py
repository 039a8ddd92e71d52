"""Bad inputs and faults, tried as a new user would: does each one work, or fail early and clearly?

  python bench/bad_inputs.py [--workdir /tmp/ltdd_bad_inputs]

Every case runs the launchers as subprocesses on the embedded digits data (tiny settings) or on a
small image folder made here, in a fresh folder, and is judged by its outcome: `works` (it is
supposed to), or `fails early` with one line (no traceback) before any network trains. Prints one
markdown row per case: the case, what happened, the exit status, the seconds until it ended, and
the line it printed. The last line counts the cases that did neither.
"""

import argparse
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--config=configs/digits_lt.py", "--config.model.width=4", "--config.experts.num_experts=2",
        "--config.experts.epochs=3", "--config.experts.batch_size=128",
        "--config.distill.syn_steps=2", "--config.distill.max_start_epoch=2",
        "--config.distill.expert_epochs=1", "--config.distill.batch_syn=20",
        "--config.distill.iterations=4", "--config.evaluate.epochs=2",
        "--config.evaluate.num_models=1", "--config.mesh.num_devices=1"]


def launch(module, args, cache, background=False):
  cmd = [sys.executable, "-m", f"launch.{module}", *args, f"--config.data.cache_dir={cache}"]
  if background:
    return subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True)
  start = time.time()
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  return proc.returncode, proc.stderr + proc.stdout, time.time() - start


def folder(root, counts, size=8, sizes=None):
  """root/c<k>/<i>.png with counts[k] images (sizes: per-class (h, w) overrides)."""
  rng = np.random.default_rng(0)
  for k, n in enumerate(counts):
    (root / f"c{k}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
      h, w = (sizes or {}).get(k, (size, size))
      Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(root / f"c{k}" / f"{i:03d}.png")
  return root


def folder_args(root, test="holdout:3", validation=2, imbalance_factor=1):
  """A folder source; balanced (IF 1) unless a case is about the long-tailed draw."""
  return ["--config.data.train_source=folder", f"--config.data.train_path={root}",
          f"--config.data.test_source={test}", f"--config.data.validation_per_class={validation}",
          "--config.data.image_size=8", "--config.data.normalize=True",
          f"--config.data.imbalance_factor={imbalance_factor}"]


def synthetic(path, **arrays):
  base = {"images": np.zeros((20, 8, 8, 1), np.float32), "labels": np.repeat(np.arange(10), 2),
          "lr": np.float32(0.01)}
  base.update(arrays)
  np.savez(path, **base)
  return f"--set=synthetic:{path}"


def first_line(text):
  lines = [l for l in text.strip().splitlines() if l.startswith(("error:", "interrupted"))]
  return (lines[-1] if lines else text.strip().splitlines()[-1] if text.strip() else "")[:160]


def judge(expect, code, text):
  clean = "Traceback" not in text
  if expect == "works":
    return "works" if code == 0 and clean else "BROKEN"
  one_line = len([l for l in text.splitlines() if l.startswith("error:")]) <= 1
  return "fails early" if code not in (0, None) and clean and one_line else "UNCLEAR"


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", default=tempfile.mkdtemp(prefix="ltdd_bad_inputs_"))
  parser.add_argument("--only", default="", help="run only the cases whose name contains this")
  args = parser.parse_args()
  root = pathlib.Path(args.workdir)
  shutil.rmtree(root, ignore_errors=True)
  root.mkdir(parents=True)
  cache = root / "cache"
  rows = []

  def case(name, expect, module, extra, check=None):
    if args.only not in name:
      return
    w = root / f"case{len(rows):02d}"
    own = [] if any(a.startswith("--workdir=") for a in extra) else [f"--workdir={w}"]
    code, text, seconds = launch(module, [*TINY, *extra, *own], cache)
    outcome = judge(expect, code, text)
    if check is not None and outcome in ("works", "fails early") and not check(w, text):
      outcome = "WRONG RESULT"
    rows.append((name, outcome, code, seconds, first_line(text)))

  # Command lines.
  case("unknown override key --config.distill.ipcc=3", "fails", "pipeline",
       ["--config.distill.ipcc=3"], lambda w, t: "did you mean 'distill.ipc'" in t)
  case("unknown section --config.two_stage.arch=shared", "fails", "pipeline",
       ["--config.two_stage.arch=shared"])
  case("wrong-typed value --config.distill.ipc=abc", "fails", "pipeline",
       ["--config.distill.ipc=abc"])
  case("unknown flag --bogus=1", "fails", "pipeline", ["--bogus=1"])
  w = root / "case_config"
  if not args.only:
    code, text, seconds = launch("pipeline", ["--config=configs/nonexistent.py",
                                              f"--workdir={w}"], cache)
    rows.append(("missing config file", judge("fails", code, text), code, seconds,
                 first_line(text)))
    code, text, seconds = launch("pipeline", ["--config=configs/digits_lt.py:profil=cpu",
                                              f"--workdir={w}"], cache)
    rows.append(("unknown :key= argument", judge("fails", code, text), code, seconds,
                 first_line(text)))
  # Config values and data the run cannot work with.
  case("unknown method dc", "fails", "pipeline", ["--config.method=dc"])
  case("random+hierarchical", "fails", "pipeline", ["--config.method=random+hierarchical"])
  case("digits at IF 1000 (classes left without images)", "fails", "pipeline",
       ["--config.data.imbalance_factor=1000"], lambda w, t: not (w / "experts").exists())
  case("inspect_data at IF 1000", "fails", "inspect_data", ["--config.data.imbalance_factor=1000"])
  case("IPC above a class's count without duplicates", "fails", "pipeline",
       ["--config.distill.ipc=50", "--config.distill.allow_duplicates=False"])
  case("IPC above a class's count with duplicates (one note per class)", "works", "evaluate",
       ["--config.distill.ipc=15", "--set=random"],
       lambda w, t: sum("repeated to reach it" in l for l in t.splitlines()) >= 2)
  one = folder(root / "one_class", [30])
  case("a folder with one class", "fails", "pipeline", folder_args(one),
       lambda w, t: not (w / "experts").exists())
  hundred = folder(root / "hundred", [3] * 100)
  case("100 classes x 3 images at IF 10", "fails", "pipeline",
       folder_args(hundred, "holdout:1", 1, imbalance_factor=10),
       lambda w, t: not (w / "experts").exists())
  empty = folder(root / "empty_class", [8, 8, 8])
  (empty / "c1b").mkdir()
  case("an empty class folder", "fails", "inspect_data", folder_args(empty),
       lambda w, t: "'c1b'" in t)
  nested = folder(root / "nested", [10, 10])
  (nested / "c1" / "sub").mkdir()
  for i in range(5):
    (nested / "c1" / f"{i:03d}.png").rename(nested / "c1" / "sub" / f"{i:03d}.png")
  case("images in sub-folders of a class folder", "works", "inspect_data", folder_args(nested),
       lambda w, t: "train 10" in t)
  mixed = folder(root / "mixed", [10, 10], sizes={1: (12, 20)})
  case("images of mixed sizes", "works", "inspect_data", folder_args(mixed),
       lambda w, t: "'squash' (10 were)" in t)
  broken = folder(root / "broken", [10, 10])
  for name in ("bad1.png", "bad2.jpg"):
    (broken / "c0" / name).write_bytes(b"not an image")
  case("two unreadable images", "fails", "inspect_data", folder_args(broken),
       lambda w, t: "bad1.png" in t and "bad2.jpg" in t)
  changed = folder(root / "changed", [12, 12])
  launch("inspect_data", [*TINY, *folder_args(changed), f"--workdir={root / 'first'}"], cache)
  for i in range(4):
    (changed / "c0" / f"{i:03d}.png").unlink()
  case("images deleted inside a class folder after a run", "works", "inspect_data",
       folder_args(changed, "holdout:1", 1), lambda w, t: "train 12 " in t)
  case("missing data path", "fails", "pipeline", folder_args(root / "nowhere"))
  (root / "notatar.tar.gz").write_bytes(b"not a tar")
  case("a .tar.gz that is not a tar", "fails", "pipeline", folder_args(root / "notatar.tar.gz"))
  (root / "afile").write_text("x")
  case("workdir is a file", "fails", "pipeline", [f"--workdir={root / 'afile'}"])
  # Synthetic sets.
  case("synthetic set with string labels", "fails", "evaluate",
       [synthetic(root / "s1.npz", labels=np.array(["cat"] * 20))])
  case("synthetic set with complex labels", "fails", "evaluate",
       [synthetic(root / "s2.npz", labels=np.zeros(20, complex))])
  case("synthetic set with object labels", "fails", "evaluate",
       [synthetic(root / "s3.npz", labels=np.array([None] * 20, dtype=object))])
  case("synthetic set with integer images", "fails", "evaluate",
       [synthetic(root / "s4.npz", images=np.zeros((20, 8, 8, 1), np.int32))])
  (root / "s5.npz").write_bytes(b"PK\x03\x04truncated")
  case("truncated synthetic set", "fails", "evaluate", [f"--set=synthetic:{root / 's5.npz'}"])
  # Runs that meet other runs, signals and resumes.
  if not args.only:  # These cases run pipelines of their own.
    hier = root / "hier"
    launch("pipeline", [*TINY, "--config.method=mtt+hierarchical", f"--workdir={hier}"], cache)
    code, text, seconds = launch("analyze_groups", [*TINY, f"--workdir={hier}"], cache)
    rows.append(("analyze_groups on an mtt+hierarchical workdir", judge("works", code, text), code,
                 seconds, first_line(text)))
    code, text, seconds = launch("pipeline", [*TINY, "--config.distill.lr_img=5", f"--workdir={hier}",
                                              "--config.method=mtt+hierarchical"], cache)
    rows.append(("rerun with another value (distill.lr_img)", judge("fails", code, text), code,
                 seconds, first_line(text)))
    busy = root / "busy"
    first = launch("pipeline", [*TINY, "--config.distill.iterations=2000", f"--workdir={busy}"],
                   cache, background=True)
    for line in first.stderr:
      if line.startswith("[distill]"):
        break
    code, text, seconds = launch("pipeline", [*TINY, f"--workdir={busy}"], cache)
    rows.append(("a second pipeline on a workdir in use", judge("fails", code, text), code, seconds,
                 first_line(text)))
    first.send_signal(signal.SIGINT)
    rest = first.stderr.read()
    code = first.wait()
    rows.append(("Ctrl-C during distillation", "fails early" if code == 130 and "Traceback" not in
                 rest else "UNCLEAR", code, 0.0, first_line(rest)))
    same = root / "same_instant"
    procs = [launch("pipeline", [*TINY, f"--workdir={same}"], cache, background=True)
             for _ in range(2)]
    texts = [p.stderr.read() for p in procs]
    codes = [p.wait() for p in procs]
    ok = sorted(codes) == [0, 1] and any("in use by PID" in t for t in texts)
    rows.append(("two pipelines started at the same instant", "fails early" if ok else "UNCLEAR",
                 max(codes), 0.0, first_line(texts[codes.index(max(codes))])))
    killed = root / "killed"
    proc = launch("pipeline", [*TINY, "--config.distill.iterations=60",
                               "--config.distill.checkpoint_every=5", f"--workdir={killed}"], cache,
                  background=True)
    for line in proc.stderr:
      if line.startswith("[distill]"):
        break
    time.sleep(3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    code, text, seconds = launch("pipeline", [*TINY, "--config.distill.iterations=60",
                                              "--config.distill.checkpoint_every=5",
                                              f"--workdir={killed}"], cache)
    rows.append(("kill -9 during distillation, then the same command", judge("works", code, text),
                 code, seconds, first_line(text) if code else "resumed: "
                 + next((l for l in text.splitlines() if "resuming" in l), "?")[:120]))

  print("| case | outcome | exit status | seconds | what it printed |")
  print("|---|---|---|---|---|")
  for name, outcome, code, seconds, line in rows:
    line = line.replace("|", "/")
    print(f"| {name} | {outcome} | {code} | {seconds:.1f} | {line} |")
  bad = [r for r in rows if r[1] not in ("works", "fails early")]
  print(f"\n{len(rows)} cases; {len(rows) - len(bad)} work or fail early and clearly; "
        f"{len(bad)} do neither{': ' + ', '.join(r[0] for r in bad) if bad else ''}.")


if __name__ == "__main__":
  main()
