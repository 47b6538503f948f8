"""Issue 15's sweeps: the demo model (configs/demo.py) trained dense, with Top-KAST at the
paper's Table 5 sparsity pairs and with magnitude pruning, plus the diagnostics (learning rate,
exploration penalty λ, refresh_every, Adam vs SGD, run length, a second text); several runs in
parallel, one JSON line per run (its summary.json plus the logged loss/penalty/mask trace)
appended to $OUT/t5_results.jsonl. Runs already in that file (same name) are skipped, so a sweep
that was cut off continues where it stopped.

  PLAN=first OUT=results STEPS=1000 PAR=13 python scripts/table5_sweep.py   # the first sweep
  PLAN=table5 LAMBDAS=1e-5 SEEDS=0,1,2 PAR=2 python scripts/table5_sweep.py  # Table 5's rows
  PLAN=diagnose TEXT=/tmp/prose.txt PAR=13 python scripts/table5_sweep.py    # the diagnostics
  LIMIT=2 STEPS=10 PAR=2 OUT=/tmp/x python scripts/table5_sweep.py           # smoke run

Environment: PLAN (first | long | diagnose | refresh | table5[:λ] | text5[:λ] (on TEXT);
several joined by commas run in that order), OUT (results folder, default /tmp/t5out), ROOT
(workdirs, default /tmp/t5), STEPS (default 1000), PAR (parallel runs), SEEDS, LAMBDAS and PRUNE
(table5's seeds, λs and pruning sparsities), TEXT (a text file for text5 and diagnose's
second-text runs, e.g. from scripts/local_prose_corpus.py; without it diagnose leaves those
out), LIMIT (only the first N runs), DEADLINE (seconds after start after which no new run
starts). On a GPU each process takes 5% of its memory. Results and their reading:
docs/science_table5_cpu.md, docs/science/.
"""

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

OUT = os.environ.get("OUT", "/tmp/t5out")
ROOT = os.environ.get("ROOT", "/tmp/t5")
STEPS = int(os.environ.get("STEPS", "1000"))
PAR = int(os.environ.get("PAR", "8"))
TRACED = ("train/loss", "train/grad_norm", "train/exploration_penalty")
PRUNE = [float(f) for f in os.environ.get("PRUNE", "0.8,0.9,0.95").split(",") if f]
PAIRS = ((0.8, 0.0), (0.8, 0.6), (0.9, 0.0), (0.9, 0.8), (0.95, 0.0), (0.95, 0.9))


class Run(NamedTuple):
    """One training run of the demo model."""

    method: str  # dense | topkast | pruning
    forward: float
    backward: float
    seed: int
    lr: float = 2e-3
    l2: float = 1e-4  # Top-KAST's exploration penalty λ
    refresh_every: int = 1
    optimizer: str = "adam"
    text: str = ""  # "" = pystdlib, else a file read as config.data.name=text
    steps: int = STEPS

    @property
    def name(self) -> str:
        data = f"_{os.path.basename(self.text)}" if self.text else ""
        return (
            f"{self.method}_{self.forward}_{self.backward}_lr{self.lr}_l{self.l2}"
            f"_r{self.refresh_every}_{self.optimizer}{data}_n{self.steps}_s{self.seed}"
        )


def first_plan() -> list[Run]:
    """The first sweep (docs/science/table5_gpu_sweep.md): λ 1e-4, lr 2e-3 and 2e-4, λ 0."""
    runs = []
    for seed in (0, 1, 2):
        runs.append(Run("dense", 0.0, 0.0, seed))
        runs += [Run("topkast", f, b, seed) for f, b in PAIRS]
        runs.append(Run("pruning", 0.9, 0.9, seed))
        for f, b in ((0.9, 0.0), (0.9, 0.8)):
            runs.append(Run("topkast", f, b, seed, lr=2e-4))  # the paper's learning rate
            runs.append(Run("topkast", f, b, seed, l2=0.0))  # no exploration penalty
        runs.append(Run("dense", 0.0, 0.0, seed, lr=2e-4))
    return runs


def table5_plan(seeds: list[int], lambdas: list[float], text: str = "") -> list[Run]:
    """Table 5's rows: dense, pruning at PRUNE (default 80/90/95%) and the six Top-KAST pairs
    per λ."""
    runs = []
    for seed in seeds:
        runs.append(Run("dense", 0.0, 0.0, seed, text=text))
        runs += [Run("pruning", f, f, seed, text=text) for f in PRUNE]
        runs += [Run("topkast", f, b, seed, l2=l2, text=text) for l2 in lambdas for f, b in PAIRS]
    return runs


def long_plan() -> list[Run]:
    """Run length: 90/0 vs 90/80 (λ 1e-4 and 0) and dense, 4 × STEPS steps, seed 0."""
    runs = [Run("dense", 0.0, 0.0, 0, steps=4 * STEPS)]
    for l2 in (1e-4, 0.0):
        runs += [
            Run("topkast", f, b, 0, l2=l2, steps=4 * STEPS) for f, b in ((0.9, 0.0), (0.9, 0.8))
        ]
    return runs


def diagnose_plan(text: str) -> list[Run]:
    """90/0 vs 90/80 under each suspected cause: refresh_every, the optimizer, the text."""
    runs = []
    pair = ((0.9, 0.0), (0.9, 0.8))
    for seed in (0, 1):
        for l2 in (1e-4, 1e-5):  # mask refresh every 100 steps
            runs += [Run("topkast", f, b, seed, l2=l2, refresh_every=100) for f, b in pair]
        runs.append(Run("dense", 0.0, 0.0, seed, lr=0.3, optimizer="sgd"))  # SGD + momentum
        for l2 in (1e-4, 0.0):
            runs += [Run("topkast", f, b, seed, lr=0.3, l2=l2, optimizer="sgd") for f, b in pair]
        if text:  # a second text
            runs.append(Run("dense", 0.0, 0.0, seed, text=text))
            runs.append(Run("pruning", 0.9, 0.9, seed, text=text))
            for l2 in (1e-4, 1e-5, 0.0):
                runs += [Run("topkast", f, b, seed, l2=l2, text=text) for f, b in pair]
    return runs


def plan_runs(token: str, seeds: list[int], lambdas: list[float], text: str) -> list[Run]:
    """The runs of one PLAN entry: ``first``, ``long``, ``diagnose``, ``refresh``, ``table5``
    (λ from LAMBDAS) or ``table5:λ`` on pystdlib, ``text5`` or ``text5:λ`` on TEXT."""
    name, _, l2 = token.partition(":")
    if name in ("table5", "text5"):
        return table5_plan(seeds, [float(l2)] if l2 else lambdas, text if name == "text5" else "")
    plans = {
        "first": first_plan,
        "long": long_plan,
        "diagnose": lambda: diagnose_plan(text),
        "refresh": refresh_plan,
    }
    if name not in plans or l2:
        sys.exit(f"PLAN entry {token!r} unknown; use {sorted(plans)}, table5[:λ] or text5[:λ]")
    return plans[name]()


def refresh_plan() -> list[Run]:
    """refresh_every 100 vs 1 where a weight outside A moves less per step: the paper's
    learning rate (2e-4) with Adam, and SGD; 90/0 and 90/80, λ 1e-4, seeds 0 and 1."""
    pair = ((0.9, 0.0), (0.9, 0.8))
    runs = []
    for seed in (0, 1):
        for every in (1, 100):
            runs += [Run("topkast", f, b, seed, lr=2e-4, refresh_every=every) for f, b in pair]
        opt = dict(lr=0.3, optimizer="sgd", refresh_every=100)
        runs += [Run("topkast", f, b, seed, **opt) for f, b in pair]
    return runs


def planned_runs() -> list[Run]:
    """The runs of $PLAN's entries, in order, without repeats, at most $LIMIT."""
    seeds = [int(s) for s in os.environ.get("SEEDS", "0,1,2").split(",")]
    lambdas = [float(v) for v in os.environ.get("LAMBDAS", "1e-5").split(",")]
    text = os.environ.get("TEXT", "")
    runs = []
    for token in os.environ.get("PLAN", "first").split(","):
        runs += [r for r in plan_runs(token, seeds, lambdas, text) if r not in runs]
    return runs[: int(os.environ.get("LIMIT", len(runs)))]


def command(run: Run, workdir: str) -> list[str]:
    """The experiment's command line for ``run``."""
    steps = run.steps
    cmd = [sys.executable, "-m", "experiments.language_model.main", "--config=configs/demo.py",
           f"--workdir={workdir}", f"--config.seed={run.seed}", f"--config.num_train_steps={steps}",
           f"--config.optim.lr={run.lr}", f"--config.optim.name={run.optimizer}",
           "--config.final_eval_max_windows=100", f"--config.sparsity.method={run.method}",
           f"--config.sparsity.forward={run.forward}",
           f"--config.sparsity.backward={run.backward if run.method == 'topkast' else run.forward}",
           ]  # fmt: skip
    if run.text:
        cmd += ["--config.data.name=text", f"--config.data.path={run.text}"]
    if run.method == "topkast":
        cmd += [
            f"--config.sparsity.exploration_l2={run.l2}",
            f"--config.sparsity.refresh_every={run.refresh_every}",
        ]
    if run.method == "pruning":
        cmd += [f"--config.sparsity.pruning_frequency={steps // 16}",
                f"--config.sparsity.begin_step={steps // 4}",
                f"--config.sparsity.end_step={3 * steps // 4}"]  # fmt: skip
    return cmd


def trace(workdir: str) -> list[dict]:
    """Per logged step: loss, grad norm, penalty and the mask statistics."""
    with open(os.path.join(workdir, "metrics.jsonl")) as fh:
        records = [json.loads(line) for line in fh]
    return [
        {k: v for k, v in r.items() if k == "step" or k in TRACED or k.startswith("masks/")}
        for r in records
    ]


def go(run: Run, deadline: float) -> None:
    """Train ``run`` (unless past ``deadline``) and append its result line."""
    if time.time() > deadline:
        return
    workdir = os.path.join(ROOT, run.name)
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false",
               XLA_PYTHON_CLIENT_MEM_FRACTION="0.05", PYTHONUNBUFFERED="1")  # fmt: skip
    start = time.time()
    proc = subprocess.run(command(run, workdir), env=env, capture_output=True, text=True)
    res = {"name": run.name, **run._asdict(), "rc": proc.returncode, "seconds": time.time() - start}
    if proc.returncode != 0:
        res["stderr"] = proc.stderr[-1500:]
    else:
        with open(os.path.join(workdir, "summary.json")) as fh:
            res.update(json.load(fh))
        res["trace"] = trace(workdir)
    print(run.name, res.get("test_bpc"), res["rc"], f"{res['seconds']:.0f}s", flush=True)
    with open(os.path.join(OUT, "t5_results.jsonl"), "a") as fh:
        fh.write(json.dumps(res) + "\n")


def done_names() -> set[str]:
    """Names of the runs already in $OUT/t5_results.jsonl that finished."""
    path = os.path.join(OUT, "t5_results.jsonl")
    if not os.path.exists(path):
        return set()
    with open(path) as fh:
        return {r["name"] for r in map(json.loads, fh) if r.get("rc") == 0}


def main() -> None:
    os.makedirs(ROOT, exist_ok=True)
    os.makedirs(OUT, exist_ok=True)
    deadline = time.time() + float(os.environ.get("DEADLINE", "inf"))
    done = done_names()
    todo = [r for r in planned_runs() if r.name not in done]
    print(f"{len(todo)} runs to do ({len(done)} already in {OUT})", flush=True)
    with ThreadPoolExecutor(PAR) as pool:
        list(pool.map(lambda r: go(r, deadline), todo))


if __name__ == "__main__":
    main()
