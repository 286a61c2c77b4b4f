"""Hydra entry point: `fedapp-sweep -m strategy=fedavg,fedprox seed=0,1,2`.

Each Hydra job runs one real Flower simulation (through `fedapp.cli.launch.run_simulation`, so
with its own SuperLink) in the job's output folder. At the end of a multirun, `SweepSummary`
writes `summary.csv` (one row per job) and `summary.md` (mean and spread over seeds for each
setting) into the sweep folder and prints the table.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fedapp.core.config import PROJECT_ROOT

SUMMARY_METRICS = (
    "test_accuracy",
    "best_test_accuracy",
    "test_loss",
    "mean_round_s",
    "total_bytes_up",
    "total_bytes_down",
)


def _setting(overrides: list[str]) -> str:
    """Overrides without the seed: jobs that differ only by seed share a setting."""
    return " ".join(sorted(o for o in overrides if not o.startswith(("seed=", "output_dir="))))


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job folder holding a results.json."""
    rows = []
    for res in sorted(sweep_dir.glob("*/results.json")):
        data = json.loads(res.read_text())
        job = res.parent
        overrides_file = job / "job_overrides.json"
        overrides = json.loads(overrides_file.read_text()) if overrides_file.exists() else []
        final = data.get("final") or {}
        rows.append(
            {
                "job": job.name,
                "setting": _setting(overrides),
                "seed": (data.get("config") or {}).get("seed"),
                "status": (data.get("meta") or {}).get("status", "unknown"),
                **{k: final.get(k) for k in SUMMARY_METRICS},
            }
        )
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean, standard deviation and count over seeds for every setting."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r["setting"]].append(r)
    out = []
    for setting, rs in sorted(groups.items()):
        entry: dict[str, Any] = {
            "setting": setting or "(defaults)",
            "runs": len(rs),
            "completed": sum(r["status"] == "completed" for r in rs),
        }
        for k in SUMMARY_METRICS:
            vals = [
                float(r[k]) for r in rs if isinstance(r.get(k), int | float) and math.isfinite(r[k])
            ]
            entry[f"{k}_mean"] = float(np.mean(vals)) if vals else None
            entry[f"{k}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
        out.append(entry)
    return out


def write_summary(sweep_dir: Path) -> str:
    rows = collect(sweep_dir)
    table = summarize(rows)
    import csv

    if rows:
        with (sweep_dir / "summary.csv").open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    lines = [
        "| setting | runs ok | final test acc (mean ± sd) | best test acc | s/round | MB up / run |",
        "|---|---|---|---|---|---|",
    ]
    for e in table:

        def ms(key: str, scale: float = 1.0, fmt: str = "{:.4f}", e: dict = e) -> str:
            m, s = e[f"{key}_mean"], e[f"{key}_std"]
            if m is None:
                return "-"
            return fmt.format(m * scale) + (f" ± {fmt.format(s * scale)}" if s is not None else "")

        lines.append(
            f"| {e['setting']} | {e['completed']}/{e['runs']} | {ms('test_accuracy')} | "
            f"{ms('best_test_accuracy')} | {ms('mean_round_s', fmt='{:.2f}')} | "
            f"{ms('total_bytes_up', 1e-6, '{:.1f}')} |"
        )
    text = "\n".join(lines) + "\n"
    (sweep_dir / "summary.md").write_text(text)
    (sweep_dir / "summary.json").write_text(json.dumps({"jobs": rows, "settings": table}, indent=2))
    return text


class SweepSummary(Callback):
    """Hydra callback: write and print the summary table when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        if sweep_dir.is_dir():
            print(
                f"\n[fedapp-sweep] summary of {sweep_dir}\n" + write_summary(sweep_dir), flush=True
            )


@hydra.main(config_path=str(PROJECT_ROOT / "conf"), config_name="config", version_base="1.3")
def _job(cfg: DictConfig) -> float | None:
    from fedapp.cli.launch import run_simulation

    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir).resolve()
    overrides = list(hc.overrides.task)
    (out / "job_overrides.json").write_text(json.dumps(overrides))
    outcome = run_simulation(overrides, out)
    if not outcome.ok:  # keep sweeping; the summary marks this job as not completed
        print(
            f"[fedapp-sweep] job in {out} ended with status {outcome.status}; see {out}/flwr_run.log",
            flush=True,
        )
        return None
    final = json.loads((out / "results.json").read_text()).get("final") or {}
    return final.get("test_accuracy")


def main() -> None:
    from fedapp.cli.launch import exit_cleanly_on_sigterm

    exit_cleanly_on_sigterm()
    _job()


if __name__ == "__main__":
    main()
