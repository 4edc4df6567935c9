"""The default study with one worker against ``--jobs N`` workers: wall time and the same results.

    python bench/study_jobs.py                      # about 7 minutes on 2 quiet cores (one run each)
    python bench/study_jobs.py --rounds 3 --jobs 2  # alternating runs, medians

Runs ``python -m ablate.study --trials T --quiet`` (the packaged default study unless ``--config``)
in fresh output folders, once as one process with torch's default threads (today's command) and
once with ``--jobs N`` (N workers, cores/N threads each), in alternating order over ``--rounds``.
The data cache (``$ABLATE_HOME``) is warmed by one untimed run first, so both arms start from the
same ready cache. Prints each arm's wall seconds (median), the ratio, the CPT tokens the study
trained (the same for both) and whether every trial's objective and held-out loss agree between
the arms (they should to the bit: training does not depend on the thread count on a CPU here).
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch


def run(out: Path, trials: int, jobs: int, config: str | None) -> float:
    command = [sys.executable, "-m", "ablate.study", "--trials", str(trials), "--quiet", "--out", str(out)]
    if config:
        command += ["--config", config]
    if jobs != 1:
        command += ["--jobs", str(jobs)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return wall


def results(out: Path) -> pd.DataFrame:
    (csv,) = out.glob("*/results.csv")
    return pd.read_csv(csv).set_index(["base", "method", "m", "repeat"]).sort_index()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="runs per arm, in alternating order (median)")
    parser.add_argument("--config", default=None, help="study YAML (default: the packaged default study)")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run(root / "warm", args.trials, 1, args.config)  # the data cache and the zoo, for both arms
        walls: dict[str, list[float]] = {"one": [], "jobs": []}
        frames: dict[str, pd.DataFrame] = {}
        for r in range(args.rounds):
            for arm in (("one", "jobs") if r % 2 == 0 else ("jobs", "one")):
                out = root / f"{arm}-{r}"
                walls[arm].append(run(out, args.trials, 1 if arm == "one" else args.jobs, args.config))
                frames[arm] = results(out)
                print(f"round {r + 1}: {arm:<4} {walls[arm][-1]:6.1f} s", flush=True)
    one, jobs = (statistics.median(walls[a]) for a in ("one", "jobs"))
    a, b = frames["one"], frames["jobs"]
    same = a.index.equals(b.index) and all(a[c].fillna(-1).equals(b[c].fillna(-1)) for c in ("objective", "val_loss"))
    tokens = int((a["tokens"].fillna(0) + a["branch_tokens"].fillna(0)).sum())
    cores = len(os.sched_getaffinity(0))
    print(f"{args.trials} trials, {tokens:,} CPT tokens; {cores} cores; bf16 native: "
          f"{bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())}; 1-minute load {load_before:.1f} before")
    print(f"one process ({torch.get_num_threads()} threads): {one:.1f} s (median of {walls['one']})")
    print(f"--jobs {args.jobs} ({max(1, cores // args.jobs)} thread each): {jobs:.1f} s (median of {walls['jobs']})")
    print(f"speed-up {one / jobs:.2f}x; objective and held-out loss of every trial identical: {same}")
    print(json.dumps({"trials": args.trials, "jobs": args.jobs, "one_s": round(one, 1), "jobs_s": round(jobs, 1),
                      "speedup": round(one / jobs, 3), "identical": same, "tokens": tokens, "cores": cores,
                      "runs": {k: [round(x, 1) for x in v] for k, v in walls.items()},
                      "bf16_native": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())}))


if __name__ == "__main__":
    main()
