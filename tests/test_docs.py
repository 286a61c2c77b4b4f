"""The documentation says what the code, the configs and the benchmarks say.

- the generated pages (`docs/generate.py`: CLI, config keys, results fields, benchmarks, the
  headline table in the README) are what the generator writes now (`--check`);
- every relative link in docs/ and the README points to a file (and a heading, for `#...`);
- every number of the headline table equals the benchmark JSON it comes from, computed here
  independently of the generator;
- the contracts the README repeats (the status table, the DP defaults) match their sources.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RESULTS = ROOT / "bench" / "results"


def _readme() -> Path:
    """The README being written (README.next.md until it replaces README.md)."""
    nxt = ROOT / "README.next.md"
    return nxt if nxt.exists() else ROOT / "README.md"


@pytest.fixture(scope="module")
def generator():
    spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pages(generator):
    return generator.render_all()


def test_the_generated_pages_are_up_to_date(pages):
    stale = [
        p.relative_to(ROOT).as_posix()
        for p, text in pages.items()
        if not p.exists() or p.read_text() != text
    ]
    assert not stale, f"stale: {stale}; run `python docs/generate.py` and commit what it writes"


def test_the_readme_shows_the_generated_headline(pages):
    readme = _readme()
    assert readme in pages, f"{readme.name} has no <!-- headline --> block"
    block = readme.read_text().split("<!-- headline -->\n")[1].split("<!-- /headline -->")[0]
    assert block == (DOCS / "_headline.md").read_text()


# -- links -----------------------------------------------------------------------------------

LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def _slugs(path: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings."""
    seen: dict[str, int] = {}
    out = set()
    for line in re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1)).replace("`", "").lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _documents() -> list[Path]:
    docs = sorted(DOCS.rglob("*.md"))
    return docs + [p for p in (ROOT / "README.next.md", ROOT / "README.md") if p.exists()]


@pytest.mark.parametrize("doc", _documents(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_points_to_a_file(doc):
    # fragments (docs/_*.md) are shown in the README: their links are relative to the root
    base = ROOT if doc.name.startswith("_") else doc.parent
    broken = []
    for m in LINK.finditer(_prose(doc.read_text())):
        target = m.group(1) or m.group(2)
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (base / path).resolve() if path else doc
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in _slugs(file):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{doc.relative_to(ROOT)}: {broken}"


# -- the headline numbers, recomputed from the JSON ----------------------------------------


def _ms(values, digits: int = 3) -> str:
    vals = [float(v) for v in values if v is not None]
    sd = f" ± {np.std(vals, ddof=1):.{digits}f}" if len(vals) > 1 else ""
    return f"{np.mean(vals):.{digits}f}{sd}"


def _json(name: str):
    return json.loads((RESULTS / name).read_text())


def _expected() -> dict[str, str]:
    """Headline row label (its start) -> the value it must state."""
    fb = _json("femnist_baselines.json")
    by = {s["strategy"]: s for s in fb["strategies"]}
    r30, r50 = fb["setup"]["rounds_default"], fb["setup"]["rounds_long"]
    long = _json("femnist_long.json")
    tab = _json("tabular_baselines.json")["rows"]
    recipe = {(c["task"], c["epsilon"]): c["drop"] for c in _json("dp_tuning.json")["cells"]}

    def tabular(task, method):
        part = "-" if method == "centralized" else "natural"
        return next(
            r["test_roc_auc"]
            for r in tab
            if (r["task"], r["method"], r["partition"]) == (task, method, part)
        )

    priv = {
        (c["task"], c["epsilon"], c["strategy"]): c["metric"]
        for c in _json("privacy.json")["cells"]
    }
    rob = {
        (c["task"], c["attack"], c["fraction"], c["strategy"]): c["final"]["test_accuracy"]
        for c in _json("robustness.json")["cells"]
    }
    sec = {(c["task"], c["mode"]): c for c in _json("secure.json")["cells"]}
    up = np.mean(
        np.array(sec["credit", "ckks"]["bytes_up"]) / np.array(sec["credit", "plain"]["bytes_up"])
    )
    speed: dict[str, list] = {}
    for c in _json("hetero.json")["cells"]:
        if c["task"] == "credit" and c["strategy"] == "tiered" and c["speedup"] is not None:
            speed.setdefault(c["profile"], []).append(c["speedup"])
    means = [np.mean(v) for v in speed.values()]
    fedavg_long = next(s for s in long["strategies"] if s["strategy"] == "fedavg")
    rounds = {v["variant"]: v for v in _json("femnist_rounds.json")["variants"]}

    def reached(variant):  # the first round at or above the target, from the run's curve
        return ", ".join("-" if r is None else str(r) for r in rounds[variant]["rounds_to_target"])

    return {
        "FEMNIST, rounds to": " / ".join(reached(v) for v in ("contribution_m", "fedavgm")),
        "FEMNIST (201 writers": f"{_ms(by['fedavg'][f'acc_round_{r30}'])} ({len(by['fedavg']['seeds'])} seeds)",
        f"FEMNIST, {r50} rounds": " / ".join(
            _ms(by[s][f"acc_round_{r50}"]) for s in ("fedavg", "fedprox", "qfedavg")
        )
        + f"; {np.mean(fb['centralized']['test_accuracy']):.3f}; {fb['majority_class_accuracy']:.3f}",
        f"FEMNIST, {long['setup']['rounds_long']} rounds": f"{np.mean(fedavg_long['acc_last10_mean']):.3f}; "
        f"{np.mean(long['centralized']['test_accuracy']):.3f}",
        "Credit default": " / ".join(
            _ms(tabular("credit", m)) for m in ("centralized", "fedavg", "fedprox")
        ),
        "Heart disease": " / ".join(_ms(tabular("medical", m)) for m in ("centralized", "fedavg")),
        "Sample-level DP with each task's shipped recipe": "; ".join(
            " / ".join(_ms(recipe[t, e]) for e in ("8", "3"))
            for t in ("credit", "medical", "bankruptcy")
        ),
        "Sample-level DP on credit before the recipes": f"{_ms(priv['credit', 'inf', 'fedavg'])} -> "
        + " / ".join(_ms(priv["credit", e, "fedavg"]) for e in ("8", "3", "1")),
        "FEMNIST with 30% label-flipping": f"{_ms(rob['femnist', 'label_flip', 0.3, 'trust'])} / "
        f"{_ms(rob['femnist', 'label_flip', 0.3, 'fedavg'])} ({_ms(rob['femnist', 'none', 0.0, 'fedavg'])})",
        "CKKS-encrypted aggregation on credit": f"{_ms(sec['credit', 'ckks']['diff'], 4)}; {up:.1f}x",
        "Tiered scheduling on credit": f"{min(means):.1f}x-{max(means):.1f}x",
    }


def test_every_headline_number_is_the_json():
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in (DOCS / "_headline.md").read_text().splitlines()[2:]
        if line.startswith("|")
    ]
    expected = _expected()
    stated = {}
    for label, value, _source in rows:
        key = next((k for k in expected if label.startswith(k)), None)
        assert key is not None, f"headline row without a check here: {label}"
        stated[key] = value
    assert stated == expected
    numbers = re.findall(r"\d+\.\d+", " ".join(stated.values()))
    assert len(numbers) >= 20  # the table states numbers, each one checked above


# -- contracts the README repeats ----------------------------------------------------------


def _status_table(text: str) -> str:
    lines = text.splitlines()
    start = next(
        i for i, ln in enumerate(lines) if ln.startswith("| status | meaning | exit code |")
    )
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    return "\n".join(lines[start:end])


def test_the_readme_s_status_table_is_the_reference_s():
    assert _status_table(_readme().read_text()) == _status_table(
        (DOCS / "reference" / "exit-codes.md").read_text()
    )


def test_the_readme_keeps_the_quick_start():
    text = _readme().read_text()
    for command in ("make run ", "make test ", "make test-all"):
        assert command in text
    if _readme().name == "README.next.md":
        assert len(text.splitlines()) <= 200


def test_the_stated_dp_defaults_are_the_yaml():
    defaults = yaml.safe_load((ROOT / "conf" / "privacy" / "sample_dp.yaml").read_text())
    line = next(
        ln
        for ln in (DOCS / "how-to" / "dp.md").read_text().splitlines()
        if ln.startswith("The defaults:")
    )
    stated = dict(re.findall(r"`privacy\.(\w+)=([^`]+)`", line))
    assert stated, line
    for key, value in stated.items():
        assert float(value) == float(defaults[key]), key


def test_the_moved_blocks_have_their_markers():
    """tests/test_deployment.py and tests/test_readme.py read these blocks."""
    deploy = (DOCS / "how-to" / "deploy.md").read_text()
    assert deploy.count("<!-- runbook -->") == 1 and deploy.count("<!-- /runbook -->") == 1
    support = (DOCS / "reference" / "support.md").read_text()
    assert support.count("<!-- support-table -->") == 1


def test_the_readme_per_site_table_is_the_personalisation_json():
    """The README's heart-disease table (<!-- personalisation -->): each site's mean over seeds
    of each model's score, computed here from bench/results/personalization.json."""
    text = _readme().read_text()
    block = text.split("<!-- personalisation -->\n")[1].split("<!-- /personalisation -->")[0]
    task = json.loads((RESULTS / "personalization.json").read_text())["tasks"]["medical"]
    rows = [r.strip("|").split("|") for r in block.strip().splitlines()[2:]]
    for i, site in enumerate(task["sites"]):
        cells = [c.strip() for c in rows[i]]
        assert cells[0] == site
        for j, model in enumerate(task["table"]):
            values = [v for v in task["table"][model][i] if v is not None]
            assert cells[2 + j] == f"{np.mean(values):.3f}", (site, model)


def test_the_trust_section_quotes_robustness_json():
    """docs/reference/strategies.md's FEMNIST numbers for trust are robustness.json's."""
    from bench.common import fmt_mean_sd

    cells = json.loads((ROOT / "bench/results/robustness.json").read_text())["cells"]
    acc = {
        (c["attack"], c["strategy"]): c["final"]["test_accuracy"]
        for c in cells
        if c["task"] == "femnist" and c["fraction"] in (0.0, 0.3)
    }
    text = " ".join((DOCS / "reference" / "strategies.md").read_text().split())
    quoted = {
        ("scaled", "trust"): fmt_mean_sd(acc["scaled", "trust"]),
        ("scaled", "multikrum"): fmt_mean_sd(acc["scaled", "multikrum"]),
        ("none", "trust_m"): fmt_mean_sd(acc["none", "trust_m"]),
        ("gaussian", "trust_m"): fmt_mean_sd(acc["gaussian", "trust_m"]),
        ("none/gaussian", "trust"): f"{fmt_mean_sd(acc['none', 'trust']).split(' ')[0]} / "
        f"{fmt_mean_sd(acc['gaussian', 'trust']).split(' ')[0]}",
    }
    for key, value in quoted.items():
        assert value in text, f"{key}: {value} not in strategies.md"
