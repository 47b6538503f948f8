"""Issue 15's diagnostic sweep: the demo model (configs/demo.py) trained dense, with Top-KAST at
the paper's Table 5 sparsity pairs, with magnitude pruning, and 90/0 vs 90/80 at the paper's
learning rate (2e-4) and without the exploration penalty; several runs in parallel, one JSON line
per run (its summary.json plus the logged loss/penalty/mask trace) appended to
$OUT/t5_results.jsonl.

  OUT=results STEPS=1000 PAR=13 python scripts/table5_sweep.py      # 39 runs (3 seeds)
  LIMIT=2 STEPS=10 PAR=2 OUT=/tmp/x python scripts/table5_sweep.py   # smoke run

Environment: OUT (results folder, default /tmp/t5out), ROOT (workdirs, default /tmp/t5), STEPS,
PAR (parallel runs), LIMIT (only the first N runs; seed 0's come first). On a GPU each process
takes 5% of its memory. Results and their reading: docs/science/table5_gpu_sweep.md.
"""

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

OUT = os.environ.get("OUT", "/tmp/t5out")
ROOT = os.environ.get("ROOT", "/tmp/t5")
STEPS = int(os.environ.get("STEPS", "1000"))
PAR = int(os.environ.get("PAR", "8"))
TRACED = ("train/loss", "train/grad_norm", "train/exploration_penalty")


def planned_runs() -> list[tuple]:
    """(method, forward, backward, seed, lr, exploration_l2, refresh_every), seed-major."""
    runs = []
    for seed in (0, 1, 2):
        runs.append(("dense", 0.0, 0.0, seed, 2e-3, 1e-4, 1))
        for f, b in ((0.8, 0.0), (0.8, 0.6), (0.9, 0.0), (0.9, 0.8), (0.95, 0.0), (0.95, 0.9)):
            runs.append(("topkast", f, b, seed, 2e-3, 1e-4, 1))
        runs.append(("pruning", 0.9, 0.9, seed, 2e-3, 1e-4, 1))
        for f, b in ((0.9, 0.0), (0.9, 0.8)):
            runs.append(("topkast", f, b, seed, 2e-4, 1e-4, 1))  # the paper's learning rate
            runs.append(("topkast", f, b, seed, 2e-3, 0.0, 1))  # no exploration penalty
        runs.append(("dense", 0.0, 0.0, seed, 2e-4, 1e-4, 1))
    return runs[: int(os.environ.get("LIMIT", len(runs)))]


def command(run: tuple, workdir: str) -> list[str]:
    method, f, b, seed, lr, l2, every = run
    cmd = [sys.executable, "-m", "experiments.language_model.main", "--config=configs/demo.py",
           f"--workdir={workdir}", f"--config.seed={seed}", f"--config.num_train_steps={STEPS}",
           f"--config.optim.lr={lr}", "--config.final_eval_max_windows=100",
           f"--config.sparsity.method={method}", f"--config.sparsity.forward={f}",
           f"--config.sparsity.backward={b if method == 'topkast' else f}"]  # fmt: skip
    if method == "topkast":
        cmd += [
            f"--config.sparsity.exploration_l2={l2}",
            f"--config.sparsity.refresh_every={every}",
        ]
    if method == "pruning":
        cmd += [f"--config.sparsity.pruning_frequency={STEPS // 16}",
                f"--config.sparsity.begin_step={STEPS // 4}",
                f"--config.sparsity.end_step={3 * STEPS // 4}"]  # fmt: skip
    return cmd


def trace(workdir: str) -> list[dict]:
    """Per logged step: loss, grad norm, penalty and the mask statistics."""
    with open(os.path.join(workdir, "metrics.jsonl")) as fh:
        records = [json.loads(line) for line in fh]
    return [
        {k: v for k, v in r.items() if k == "step" or k in TRACED or k.startswith("masks/")}
        for r in records
    ]


def go(run: tuple) -> dict:
    method, f, b, seed, lr, l2, every = run
    name = f"{method}_{f}_{b}_lr{lr}_l{l2}_r{every}_s{seed}"
    workdir = os.path.join(ROOT, name)
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false",
               XLA_PYTHON_CLIENT_MEM_FRACTION="0.05", PYTHONUNBUFFERED="1")  # fmt: skip
    start = time.time()
    proc = subprocess.run(command(run, workdir), env=env, capture_output=True, text=True)
    res = {"name": name, "method": method, "forward": f, "backward": b, "seed": seed, "lr": lr,
           "l2": l2, "refresh_every": every, "rc": proc.returncode,
           "seconds": time.time() - start}  # fmt: skip
    if proc.returncode != 0:
        res["stderr"] = proc.stderr[-1500:]
    else:
        with open(os.path.join(workdir, "summary.json")) as fh:
            res.update(json.load(fh))
        res["trace"] = trace(workdir)
    print(name, res.get("test_bpc"), res["rc"], f"{res['seconds']:.0f}s", flush=True)
    with open(os.path.join(OUT, "t5_results.jsonl"), "a") as fh:
        fh.write(json.dumps(res) + "\n")
    return res


def main() -> None:
    os.makedirs(ROOT, exist_ok=True)
    os.makedirs(OUT, exist_ok=True)
    with ThreadPoolExecutor(PAR) as pool:
        list(pool.map(go, planned_runs()))


if __name__ == "__main__":
    main()
