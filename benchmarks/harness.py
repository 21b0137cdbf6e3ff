"""The one measuring and recording harness of benchmarks/ and experiments/: timing, memory in a fresh child
process, and the results json. Why one: two ways of measuring give two kinds of number, and a results file that
does not say which command, commit and machine made it cannot be compared with the next one.

Imports only the standard library at the top, so that a child process measures its own work, not torch's import
(torch, report and precision are imported where they are used).
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Rewritten by the commands themselves: a results file changed by one command does not make the next one's code dirty
RESULT_PATHS = ("experiments/results", "benchmarks/results", "benchmarks/results.json")

# The scripts import this file at their start (after torch), so a results file says how long its command ran
STARTED = time.perf_counter()


def _synchronize(device) -> None:
    if device is not None and device.type == "cuda":
        import torch
        torch.cuda.synchronize()


def timed_rounds(contenders: Mapping[str, Callable[[], Any]], rounds: int, warmup: int,
                 device=None) -> dict[str, float]:
    """Median seconds per call of each contender. They run side by side, alternating every round, after `warmup`
    rounds that are not counted: a machine that slows down or speeds up (another process, the CPU's clock,
    caches) then slows every contender alike, and the median ignores the odd slow call. On a CUDA `device` the
    clock is read after the GPU has finished."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(warmup + rounds):
        for name, fn in contenders.items():
            _synchronize(device)
            start = time.perf_counter()
            fn()
            _synchronize(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_memory_during(run: Callable[[], Any], device=None) -> float:
    """Peak memory (MB) while `run()` executes: max allocated on CUDA, RSS sampled every 2 ms on CPU (device None
    is CPU). Call it in a fresh process (`measure_in_child`): RSS also counts the interpreter, the model and
    whatever the process held before."""
    if device is not None and device.type == "cuda":
        import torch
        from report import peak_memory_mb
        torch.cuda.reset_peak_memory_stats()
        run()
        return peak_memory_mb(device)
    # Building the model leaves freed temporaries in the allocator's pools, which would hide the training
    # peak in ru_maxrss: return them to the OS, then sample RSS while `run` executes.
    import psutil
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    process, peak, done = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.002)
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        run()  # two steps or more: the second already holds the optimizer state
    finally:
        done.set()
        sampler.join()
    return peak[0] / 2**20


def measure_in_child(target: str, **kwargs: Any) -> dict:
    """Run `target` ("path/from/repo/root.py:function") with `kwargs` in a fresh Python process and return the
    dict it returns (which it printed as one JSON line). Why a process per measurement: peak RSS counts all a
    process ever held, so two setups measured in one process would share one peak."""
    path, function = target.rsplit(":", 1)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), path, function, json.dumps(kwargs)],
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{target}({kwargs}) failed in its child process:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_child(argv: Sequence[str]) -> None:
    """The child's side of `measure_in_child`: import the file, call the function, print its dict as the last line."""
    path, function, kwargs = argv
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0],
                                                  os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = getattr(module, function)(**json.loads(kwargs))
    print(json.dumps(result), flush=True)


def command_line(script: str, argv: Optional[Sequence[str]] = None) -> str:
    """How to run it again: `python <script> <arguments>` (argv None: this process's own arguments)."""
    return "python " + shlex.join([script, *(sys.argv[1:] if argv is None else argv)])


def git_state() -> dict:
    """The commit the code came from, and whether tracked files other than results and docs (*.md, which a
    measurement never reads) differed from it."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    try:
        head = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                      *(f":(exclude){p}" for p in RESULT_PATHS), ":(exclude,glob)**/*.md")
    except OSError:  # no git here
        return {"commit": None, "dirty": None}
    if head.returncode != 0 or changed.returncode != 0:  # not a checkout
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(changed.stdout.strip())}


def machine(device=None) -> dict:
    """What the figures were measured on: the processor or GPU, and the precision `auto` picks there."""
    import torch
    from precision import cpu_has_native_bf16, resolve_precision
    from report import machine_description
    device = device if device is not None else torch.device("cpu")
    return {"description": machine_description(device), "device": str(device),
            "native_cpu_bf16": cpu_has_native_bf16(), "auto_precision": resolve_precision("auto", device)}


def write_results(path: str, data: Mapping[str, Any], command: Optional[str] = None,
                  seeds: Optional[Iterable[int]] = None, device=None) -> dict:
    """Write a results json, atomically: the header (command, git commit, machine, library versions, UTC date,
    seeds, seconds since the command started), then `data`'s figures at the top level. Every results file of benchmarks/ and experiments/ is
    written here, so each says how to make it again and where it was made. Returns what was written."""
    from report import library_versions, write_json_atomic
    header = {"command": command if command is not None else command_line(os.path.relpath(sys.argv[0], ROOT)),
              "git": git_state(), "machine": machine(device), "versions": library_versions(),
              "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "seeds": list(seeds) if seeds is not None else None,
              "command_seconds": round(time.perf_counter() - STARTED, 1)}
    clash = set(header) & set(data)
    if clash:
        raise ValueError(f"the figures use the header's keys {sorted(clash)}: pass seeds as seeds=, rename the rest")
    results = {**header, **data}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json_atomic(path, results)
    return results


if __name__ == "__main__":
    # `python benchmarks/harness.py PATH FUNCTION KWARGS_JSON`: one measurement (measure_in_child). Run through
    # the imported module (this folder is sys.path[0]), so that the measured code and this entry share one
    # `harness`, not two copies.
    import harness
    harness.run_child(sys.argv[1:])
