"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np


def completed(path: Path, length: int, key: str = "round") -> dict | None:
    """results.json of a finished run of exactly `length` rounds (or epochs), else None."""
    if not path.exists():
        return None
    res = json.loads(path.read_text())
    steps = res.get("rounds") or res.get("epochs") or []
    done = res.get("final") is not None and (res.get("meta") or {}).get("status", "completed") in (
        "completed",
        "degraded",
    )
    return res if done and steps and steps[-1][key] == length else None


def train_seconds(results: dict) -> float:
    """The clients' training seconds of a run, summed over its accepted training replies."""
    return sum(
        c.get("train_time_s") or 0.0
        for r in results["rounds"]
        for c in r["clients"]
        if c["phase"] == "train" and c["status"] == "ok"
    )


def fmt_mean_sd(values: list[float | None], digits: int = 3) -> str:
    """'mean ± sd' over the non-missing values (sd only for two or more), '-' for none."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    sd = f" ± {float(np.std(vals, ddof=1)):.{digits}f}" if len(vals) > 1 else ""
    return f"{float(np.mean(vals)):.{digits}f}{sd}"


# Looked up once in the parent: a child between fork and exec should only make the call.
_PRCTL = None
if sys.platform.startswith("linux"):
    import ctypes

    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when the bench process dies (a killed
    bench script would otherwise leave its runs computing for an hour). Elsewhere: nothing."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def run_inline_job(overrides: list[str], out: Path, log_path: Path, cwd: Path) -> bool:
    """One `fedapp.cli.inline` run in a single-threaded CPU subprocess (so a run's numbers do not
    depend on how many run beside it); its log goes to `log_path`. True when it succeeded."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",  # CPU: identical numbers wherever the bench runs
    }
    with log_path.open("w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedapp.cli.inline", *overrides, "--output-dir", str(out)],
            cwd=cwd,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        try:
            proc.wait()
        except BaseException:  # Ctrl-C in the bench script: do not leave the run behind
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    return proc.returncode == 0


def run_and_audit(
    overrides: list[str], out: Path, cwd: Path, rounds: int, reuse: bool = True
) -> bool:
    """`run_inline_job` into `out`, then `fedapp-audit` on it (log: `out/audit.log`). True
    when both succeeded.

    With `reuse`, a run of `rounds` rounds that already finished in `out` is only audited again
    (its audit was interrupted). Any other earlier attempt in `out` is removed first, with a
    line saying so: its clients' saved state (their privacy ledgers above all) belongs to that
    attempt, and a new run on top of it would be refused as a second release."""
    if not (reuse and completed(out / "results.json", rounds) is not None):
        if out.exists() and any(out.iterdir()):
            print(f"[bench] {out.name}: removing an earlier attempt", flush=True)
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        if not run_inline_job(overrides, out, out / "inline.log", cwd):
            return False
    with (out / "audit.log").open("w") as fh:
        cmd = [sys.executable, "-m", "fedapp.features.audit", str(out)]
        return subprocess.call(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT) == 0


def run_pool(todo: list, jobs: int, work) -> None:
    """`work(item) -> (name, ok)` over `todo`, `jobs` at a time, one progress line each."""
    from concurrent.futures import ThreadPoolExecutor
    from time import perf_counter

    t0 = perf_counter()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for i, (name, ok) in enumerate(pool.map(work, todo), 1):
            print(
                f"[bench] {i}/{len(todo)} {name}: {'ok' if ok else 'FAILED'}  "
                f"{(perf_counter() - t0) / 60:.1f} min",
                flush=True,
            )
