"""How well `fedapp-schema` infers a table it has never seen (issue 31, part 3): the YAML it
writes for a mortgage-application stand-in against a hand-written one, trained federated.

The issue's mortgage table (1,989 rows, 60 columns, integer-coded categories, 999 as a missing
code) is not on this machine; `tests/fedapp/byod_fixtures.py:mortgage_table` draws a stand-in
with those properties (16 coded categories whose effect is not monotone in the code, 999 / 9999
/ -1 missing codes in four numeric columns, blank incomes, noise columns, a constant and a row
number). Compared, each over the same seeds (5 IID clients, 10 rounds, `fedapp.cli.inline`):
- `inferred`: `fedapp-schema mortgage.csv --label action_taken --positive 3`, as written;
- `inferred_before` (with `--before-src DIR`): the YAML of the tool in DIR (an older checkout);
- `hand_written`: coded categories declared, missing codes declared, missing indicators on;
and pooled logistic regression on each YAML's features (the same train/test split) as a
ceiling. Test ROC-AUC on the server's held-out 20%. Each YAML is trained in three settings
(SETTINGS): the issue's (the default MLP, 10 rounds), the same MLP to convergence (30 rounds), and
a federated logistic regression (10 rounds).

    .venv/bin/python bench/schema_inference.py [--seeds 0 1 2] [--before-src /tmp/old]

Writes bench/results/schema_inference.{json,md}. About 3-8 s per run on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fedapp.byod_fixtures import mortgage_table  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def hand_written(csv: Path, truth: dict) -> dict:
    """The YAML a careful analyst writes, knowing the codebook."""
    return {
        "defaults": ["_tabular_defaults", "_tabular_train", "_self_"],
        "name": "mortgage_hand",
        "files": [{"path": str(csv)}],
        "schema": {
            "label": truth["label"],
            "positive": truth["positive"],
            "negative": truth["negative"],
            "numeric": truth["numeric"],
            "categorical": truth["coded"],
            "drop": truth["drop"],
            "natural_id": None,
            "missing_tokens": [""],
            "missing_codes": truth["missing_codes"],
            "missing_indicators": True,
        },
    }


# (name, overrides): the issue's setting, then the same MLP trained to convergence, and a
# federated logistic regression (10 rounds)
SETTINGS = {
    "mlp, 10 rounds": ["rounds=10"],
    "mlp, 30 rounds": ["rounds=30"],
    "logreg, 10 rounds": ["rounds=10", "task.model=logreg"],
}


def run(task: str, tasks: Path, seed: int, out: Path, setting: list[str]) -> dict:
    from fedapp.cli.inline import run_inline

    res_dir = run_inline(
        [
            f"hydra.searchpath=[file://{tasks}]",
            f"task={task}",
            "partition=iid",
            "partition.num_partitions=5",
            *setting,
            "eval_clients_per_round=0",
            "checkpoint=false",
            f"seed={seed}",
            f"data_dir={tasks}",
        ],
        out,
    )
    res = json.loads((res_dir / "results.json").read_text())
    last = res["rounds"][-1]
    return {"seed": seed, "test_roc_auc": last["test_roc_auc"], "test_f1": last.get("test_f1")}


def pooled_logreg(task: str, tasks: Path, seed: int) -> float:
    """Logistic regression on every training row (the task's own split and features)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from fedapp.core.config import compose
    from tasks import get_task
    from tasks.tabular import combine_stats, featurize, numeric_stats

    cfg = compose(
        [f"hydra.searchpath=[file://{tasks}]", f"task={task}", f"seed={seed}", f"data_dir={tasks}"]
    )
    t = get_task(cfg, tasks)
    train, test = t.load_centralized_train(), t.load_central_test()
    prep = combine_stats([numeric_stats(train, 2)])
    xtr, ytr = (a.numpy() for a in featurize(train, t.schema, prep).tensors)
    xte, yte = (a.numpy() for a in featurize(test, t.schema, prep).tensors)
    model = LogisticRegression(max_iter=5000, C=1.0).fit(xtr, ytr)
    return float(roc_auc_score(yte, model.predict_proba(xte)[:, 1]))


def schema_tool(src: Path, csv: Path, out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, "-m", "fedapp.cli.schema", str(csv), "--label", "action_taken"]
    proc = subprocess.run(  # cwd=src: `-m` puts the working folder first on sys.path
        [*cmd, "--positive", "3", "-o", str(out)], env=env, capture_output=True, text=True, cwd=src
    )
    if proc.returncode:
        raise SystemExit(f"fedapp-schema ({src}) failed: {proc.stderr}")


def summary(yaml_path: Path) -> dict:
    s = yaml.safe_load(yaml_path.read_text())["schema"]
    return {
        "numeric": len(s.get("numeric") or []),
        "categorical": sorted(s.get("categorical") or {}),
        "drop": sorted(s.get("drop") or {}),
        "missing_codes": s.get("missing_codes") or {},
        "missing_indicators": bool(s.get("missing_indicators")),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--before-src", type=Path, default=None)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        tasks = Path(tmp) / "tasks"
        (tasks / "task").mkdir(parents=True)
        csv = tasks / "mortgage.csv"
        truth = mortgage_table(csv)
        configs = {"inferred": tasks / "task" / "mortgage.yaml"}
        schema_tool(ROOT, csv, configs["inferred"])
        if args.before_src:
            configs["inferred_before"] = tasks / "task" / "mortgage_before.yaml"
            schema_tool(args.before_src, csv, configs["inferred_before"])
        configs["hand_written"] = tasks / "task" / "mortgage_hand.yaml"
        configs["hand_written"].write_text(yaml.safe_dump(hand_written(csv, truth)))
        results: dict = {
            "meta": {
                "table": "tests/fedapp/byod_fixtures.py:mortgage_table(n=1989, seed=0), 60 columns",
                "setting": "partition=iid num_partitions=5 (fedapp.cli.inline), test ROC-AUC",
                "settings": {k: SETTINGS[k] for k in args.settings},
                "seeds": args.seeds,
            },
            "configs": {},
        }
        for name, path in configs.items():
            entry: dict = {"schema": summary(path), "settings": {}}
            for label in args.settings:
                rows = [
                    run(
                        path.stem,
                        tasks,
                        s,
                        Path(tmp) / "runs" / f"{name}_{label}_{s}",
                        SETTINGS[label],
                    )
                    for s in args.seeds
                ]
                aucs = [r["test_roc_auc"] for r in rows]
                entry["settings"][label] = {
                    "runs": rows,
                    "roc_auc_mean": float(np.mean(aucs)),
                    "roc_auc_sd": float(np.std(aucs, ddof=1)) if len(aucs) > 1 else 0.0,
                }
                print(name, label, entry["settings"][label]["roc_auc_mean"], flush=True)
            pooled = [pooled_logreg(path.stem, tasks, s) for s in args.seeds]
            entry["pooled_logreg_roc_auc"] = float(np.mean(pooled))
            entry["pooled_logreg_roc_auc_sd"] = (
                float(np.std(pooled, ddof=1)) if len(pooled) > 1 else 0.0
            )
            results["configs"][name] = entry
        results["inferred_yaml"] = configs["inferred"].read_text()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "schema_inference.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / "schema_inference.md").write_text(markdown(results))
    print("wrote bench/results/schema_inference.{json,md}")
    return 0


def markdown(results: dict) -> str:
    meta = results["meta"]
    settings = list(meta["settings"])
    lines = [
        "# fedapp-schema's inference on an unseen mortgage table (issue 31, part 3)",
        "",
        f"Table: {meta['table']} (a generated stand-in: the issue's real mortgage table is not "
        f"on this machine). {meta['setting']}, seeds {meta['seeds']} (mean ± sd). Pooled "
        "logistic regression (sklearn, every training row, the same split and features): the "
        "ceiling. Regenerate: `.venv/bin/python bench/schema_inference.py --before-src <old "
        "checkout>`.",
        "",
        "The issue's numbers, on the real table (mlp, 10 rounds): the tool's YAML 0.858, a "
        "hand-written one 0.893, pooled logistic regression 0.933. They are not comparable "
        "with the stand-in's.",
        "",
        "| YAML | "
        + " | ".join(f"federated ROC-AUC, {s}" for s in settings)
        + " | pooled logistic regression | numeric | categorical | missing codes | "
        "missing indicators | dropped |",
        "|---" * (len(settings) + 7) + "|",
    ]
    names = {
        "inferred_before": "fedapp-schema before issue 31",
        "inferred": "fedapp-schema now",
        "hand_written": "hand-written (codebook known)",
    }
    for key in ("inferred_before", "inferred", "hand_written"):
        c = results["configs"].get(key)
        if not c:
            continue
        s = c["schema"]
        cells = [
            f"{c['settings'][k]['roc_auc_mean']:.3f} ± {c['settings'][k]['roc_auc_sd']:.3f}"
            for k in settings
        ]
        lines.append(
            f"| {names[key]} | " + " | ".join(cells) + " | "
            f"{c['pooled_logreg_roc_auc']:.3f} ± {c.get('pooled_logreg_roc_auc_sd', 0):.3f} | "
            f"{s['numeric']} | {len(s['categorical'])} | "
            f"{', '.join(f'{k}: {v}' for k, v in s['missing_codes'].items()) or '-'} | "
            f"{'on' if s['missing_indicators'] else 'off'} | {', '.join(s['drop']) or '-'} |"
        )
    lines += ["", "Per seed:", ""]
    for key, c in results["configs"].items():
        for k in settings:
            runs = ", ".join(f"{r['test_roc_auc']:.3f}" for r in c["settings"][k]["runs"])
            lines.append(f"- {names.get(key, key)}, {k}: {runs}")
    lines += ["", "The YAML fedapp-schema writes now (comments: what to confirm):", "", "```yaml"]
    lines += [results["inferred_yaml"].rstrip(), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
