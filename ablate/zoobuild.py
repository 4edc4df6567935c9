"""Building several zoo models side by side, each in a worker process of its own.

A zoo build is one single-process training run, so on a CPU machine :func:`build_many` runs the
missing ones at once, one worker per model up to the CPU count, each with its share of the torch
threads (on a GPU one at a time, in this process). A worker builds exactly what
:func:`ablate.zoo.build` builds in-process with the same thread count. The point is wall time:
on two cores the default zoo builds side by side in about the time of its slowest model alone,
well under the sum one after the other (see studies/LOG.md, 2026-12-02 "Measurements formerly in
module docstrings", part "Zoo build side by side").

Written by hand around ``concurrent.futures``: the pool gives processes and futures, but no
shared progress bar, no stopping of running workers on Ctrl-C (``terminate_workers`` arrives in
Python 3.14) and no cleanup of their unfinished folders; those are the parts below.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from ablate.data import load_packed
from ablate.errors import UserError, cli
from ablate.fsutil import ablate_home, waiting_lock
from ablate.zoo import (
    POLL_S,
    ZOO,
    ZooSpec,
    build,
    data_args,
    install_shipped,
    is_built,
    ship,
    shipped,
    spec_of,
    zoo_dir,
    zoo_tokenizer,
)

__all__ = ["build_many", "main"]


def build_many(names: Iterable[str | ZooSpec], *, jobs: int | None = None, progress: bool = True,
               force: bool = False, threads: int | None = None) -> dict[str, Path]:
    """Build the named zoo models (or specs) that are missing, ``jobs`` at a time; return name -> folder.

    A build trains on one process, so on a CPU several run side by side, each in a worker process
    with ``threads`` torch threads (default: the usable CPUs shared out among the jobs). ``jobs``
    defaults to one per missing model up to the CPU count, and to 1 with CUDA (a GPU build takes
    seconds, and processes would fight over one device); with one job the builds run in this
    process. Workers are spawned, not forked (forking a process whose torch thread pools are
    running can deadlock). A worker builds exactly what :func:`build` builds in-process with the
    same thread count. A failed build lets the builds already running finish, cancels the rest and
    raises its error (a :class:`UserError` stays one); Ctrl-C stops every worker, and each removes
    its unfinished folder, so nothing half-built is left. One process per ``ABLATE_HOME`` builds at
    a time; another calling meanwhile waits and then builds only what is still missing.
    """
    specs = _resolve(names)
    if not force:
        for spec in specs:  # the package's own builds first: seconds instead of minutes
            if not is_built(spec):
                install_shipped(spec)
    if not force and all(map(is_built, specs)):
        return {s.name: zoo_dir(s.name) for s in specs}
    with _zoo_lock(progress):  # one builder per ABLATE_HOME: other processes wait, then reuse
        _build_missing(specs, jobs, threads, force, progress)
    return {s.name: zoo_dir(s.name) for s in specs}


@contextlib.contextmanager
def _zoo_lock(progress: bool):
    """Hold ``ablate_home()/.zoo-build.lock``. Several study workers started at once on one machine
    would otherwise each build the whole zoo, side by side on the same cores (the same bits, at a
    multiple of the time); the ones that wait find the models built when they get the lock."""
    home = ablate_home()
    waiting = f"another process is building the zoo in {home / 'zoo'}; waiting for it" if progress else None
    with waiting_lock(home / ".zoo-build.lock", waiting):
        yield


def _build_missing(specs: list[ZooSpec], jobs: int | None, threads: int | None, force: bool,
                   progress: bool) -> None:
    todo = [s for s in specs if force or not is_built(s)]
    jobs, threads = _plan(len(todo), jobs, threads)
    start = time.perf_counter()
    if jobs == 1:
        for spec in todo:
            build(spec, force=force, progress=progress, threads=threads)
    elif todo:
        if progress:
            print(f"building {len(todo)} zoo models in {jobs} processes x {threads} torch thread"
                  f"{'s' * (threads > 1)}: {', '.join(s.name for s in todo)}")
        _prepack(todo, progress)
        _run_pool(todo, jobs, threads, force, progress)
    if progress and todo:
        for spec in todo:
            info = json.loads((zoo_dir(spec.name) / "zoo.json").read_text())
            print(f"{spec.name:<12} built in {info['wall_s']:5.0f} s, val loss {info['final_val_loss']:.3f}  "
                  f"{zoo_dir(spec.name)}")
        print(f"{len(todo)} zoo model{'s' * (len(todo) > 1)} built in {time.perf_counter() - start:.0f} s")


def _resolve(names: Iterable[str | ZooSpec]) -> list[ZooSpec]:
    """Specs of ``names``, all checked before the first (minutes-long) build starts."""
    specs: dict[str, ZooSpec] = {}
    for spec in [names] if isinstance(names, (str, ZooSpec)) else names:
        spec = spec if isinstance(spec, ZooSpec) else spec_of(spec)
        if specs.setdefault(spec.name, spec) != spec:
            raise UserError(f"two different specs are named {spec.name!r}; give each its own name")
    return list(specs.values())


def _plan(missing: int, jobs: int | None, threads: int | None) -> tuple[int, int]:
    """(processes, torch threads per process) for ``missing`` builds."""
    import torch

    if jobs is not None and jobs < 1:
        raise UserError(f"jobs={jobs}: give at least 1 (or leave it out for one per missing model)")
    if threads is not None and threads < 1:
        raise UserError(f"threads={threads}: a build needs at least one CPU thread")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if jobs is None:
        jobs = 1 if torch.cuda.is_available() else cpus
    jobs = max(1, min(jobs, missing))
    return jobs, threads or max(1, cpus // jobs)


def _prepack(specs: list[ZooSpec], progress: bool) -> None:
    """Pack here the data that several of ``specs`` share, so no two workers write one cache."""
    counts = Counter(tuple(sorted(data_args(s).items())) for s in specs)
    shared = [dict(key) for key, n in counts.items() if n > 1]
    if shared:
        tokenizer = zoo_tokenizer()
        for args in shared:
            load_packed("synthetic", tokenizer, progress=progress, **args)


def _run_pool(specs: list[ZooSpec], jobs: int, threads: int, force: bool, progress: bool) -> None:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    context = multiprocessing.get_context("spawn")
    state = context.RawArray("d", 2 * len(specs))  # per build: steps done, tokens/s (one writer each)
    pool = ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker,
                               initargs=(state, str(ablate_home())))
    bar = _Bar(specs, state, progress)
    errors: list[BaseException] = []
    try:
        # the longest first (cost ~ tokens x layers x width^2), so a short one is what starts last
        order = sorted(range(len(specs)), key=lambda i: -specs[i].train_tokens * specs[i].num_layers
                       * specs[i].hidden_size ** 2)
        pending = {pool.submit(_worker, i, specs[i], threads, force): i for i in order}
        futures = dict(pending)
        while pending:
            finished, _ = wait(pending, timeout=POLL_S, return_when=FIRST_COMPLETED)
            for future in finished:
                del pending[future]
                error = None if future.cancelled() else future.exception()
                if error is None:
                    bar.finished.add(futures[future])
                elif not errors:
                    errors.append(error)
                    bar.write(f"{specs[futures[future]].name} failed: {' '.join(str(error).split())[:200]}"
                              + ("; waiting for the builds still running" if pending else ""))
                    for other in pending:
                        other.cancel()  # those not started yet; running ones finish
            bar.show()
        pool.shutdown()
    except BaseException:
        _terminate(pool)
        raise
    finally:
        bar.close()
    if errors:
        raise errors[0]


def _terminate(pool) -> None:
    """Stop the workers now (SIGTERM: each removes its unfinished folder) and wait until they exit."""
    # the pool has no public handle on its processes before Python 3.14 (terminate_workers)
    processes = list((pool._processes or {}).values())
    for p in processes:
        p.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
            p.join()


class _Bar:
    """One tqdm bar over the pretraining steps of every build, fed by the workers' shared state."""

    def __init__(self, specs: list[ZooSpec], state, enabled: bool):
        from tqdm.auto import tqdm

        self.specs, self.state, self.finished = specs, state, set()
        self.steps = [s.train_tokens // s.tokens_per_step for s in specs]
        self.bar = tqdm(total=sum(self.steps), unit="step", disable=not enabled, dynamic_ncols=True,
                        desc="pretraining", bar_format="{desc}: {percentage:3.0f}%|{bar}| "
                        "{n_fmt}/{total_fmt} steps [{elapsed}{postfix}]")

    def show(self) -> None:
        from tqdm import tqdm

        done, rate, lefts = 0, 0.0, []
        for i, spec in enumerate(self.specs):
            step, tok_s = min(int(self.state[2 * i]), self.steps[i]), self.state[2 * i + 1]
            if i in self.finished:
                step = self.steps[i]
            else:  # no tokens/s yet (still packing its data): no estimate
                rate += tok_s
                lefts.append((self.steps[i] - step) * spec.tokens_per_step / tok_s if tok_s else None)
            done += step
        left = "?" if None in lefts else tqdm.format_interval(max(lefts, default=0))
        self.bar.n = done
        self.bar.set_postfix_str(f"{rate / 1e3:.1f}k tok/s, {left} left", refresh=False)
        self.bar.refresh()

    def write(self, line: str) -> None:
        if not self.bar.disable:
            self.bar.write(line, file=sys.stderr)  # above the bar, which tqdm draws on stderr

    def close(self) -> None:
        self.bar.close()


_STATE = None  # a worker's shared progress array
_BUILDING = False  # True while a worker trains: SIGTERM then unwinds, so its temporary folder goes


def _init_worker(state, home: str) -> None:
    global _STATE
    # Ctrl-C reaches every process of the terminal; the parent decides, and stops us with SIGTERM
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    os.environ["ABLATE_HOME"] = home  # inherited anyway; explicit, so builds land where the parent looks
    _STATE = state
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Writing model shards" bars from save_pretrained


def _on_sigterm(signum, frame) -> None:
    if _BUILDING:
        raise KeyboardInterrupt  # unwinds atomic_dir, which removes the unfinished folder
    raise SystemExit(0)  # an idle worker just leaves


def _worker(index: int, spec: ZooSpec, threads: int, force: bool) -> None:
    global _BUILDING

    def report(step: int, tokens_per_s: float) -> None:
        _STATE[2 * index], _STATE[2 * index + 1] = step, tokens_per_s

    _BUILDING = True
    try:
        build(spec, force=force, progress=False, threads=threads, on_step=report)
    finally:
        _BUILDING = False


def _list() -> None:
    for name, spec in ZOO.items():
        meta = zoo_dir(name) / "zoo.json"
        if is_built(name):
            info = json.loads(meta.read_text())
            acc = " ".join(f"{v:.2f}" for v in info["synth_acc"].values())
            state = (f"built  {info['parameters']:>7,} params  val loss {info['final_val_loss']:.3f}  "
                     f"acc k1.. {acc}  {zoo_dir(name)}")
        elif shipped(spec) is not None:
            state = "shipped with ablate (installed on first use, no pretraining)"
        else:
            state = f"not built (python -m ablate.zoo build {name})"
        print(f"{name:<12} {spec.family:<8} {spec.num_layers:>2} layers x {spec.hidden_size:<4} {state}")


@cli
def main(argv: list[str] | None = None, *, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog or "python -m ablate.zoo",
                                     description="The built-in base models: list them, or build the missing ones.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="each zoo model: built or not, parameters, folder, final val loss")
    b = sub.add_parser("build", help="pretrain the named zoo models (default: all) that are not built")
    b.add_argument("names", nargs="*", metavar="NAME", help=f"zoo names: {', '.join(ZOO)}")
    b.add_argument("--force", action="store_true", help="rebuild even when built")
    b.add_argument("--jobs", type=int, default=None, help="models built at once, each in its own process "
                   "(default: one per missing model up to the CPU count; 1 with CUDA)")
    b.add_argument("--threads", type=int, default=None, help="torch threads per build (default: the CPUs "
                   "shared out among the jobs; give 1 when other processes share the cores)")
    s = sub.add_parser("ship", help="(maintainers) copy a build into the package's shipped builds, with sha256s")
    s.add_argument("name", metavar="NAME", help=f"zoo name: {', '.join(ZOO)}")
    s.add_argument("--from", dest="folder", default=None, help="a build folder (default: the zoo folder)")
    args = parser.parse_args(argv)
    if args.command == "list":
        _list()
        return 0
    if args.command == "ship":
        print(f"{args.name}: shipped in {ship(spec_of(args.name), args.folder)}")
        return 0
    names = args.names or list(ZOO)
    missing = [n for n in names if args.force or not is_built(spec_of(n))]
    for name, folder in build_many(names, jobs=args.jobs, threads=args.threads, force=args.force).items():
        if name not in missing:
            print(f"{name}: already built in {folder}")
    return 0


if __name__ == "__main__":
    main()
