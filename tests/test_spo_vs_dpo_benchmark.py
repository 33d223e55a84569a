"""benchmarks/spo_vs_dpo.py reads a pipeline run's outputs into the seed table and the learning curves."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("spo_vs_dpo", REPO_ROOT / "benchmarks" / "spo_vs_dpo.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def fake_run(root, shift: float):
    """The files one `dvc repro` leaves: evaluation metrics, both methods' metrics, histories, curves."""
    models = {m: {k: v + shift for k, v in zip(bench.METRICS, values)}
              for m, values in (("base", (0.4, 0.99, 1.4)), ("spo", (0.6, 0.8, 1.4)), ("dpo", (0.45, 0.99, 1.44)))}
    rates = {"spo_vs_base": 0.9, "dpo_vs_base": 0.7, "dpo_vs_spo": 0.3 + shift}
    (root / "reports/evaluate").mkdir(parents=True, exist_ok=True)
    (root / "reports/evaluate/metrics.json").write_text(json.dumps(
        {"models": models, "win_rate": {p: {k: r for k in bench.METRICS} for p, r in rates.items()}}))
    for method, seconds in (("spo", 100.0), ("dpo", 95.0 + 10 * shift)):
        d = root / "models" / method
        d.mkdir(parents=True, exist_ok=True)
        (d / "metrics.json").write_text(json.dumps({"optimizer_steps": 10.0}))
        (d / "history.csv").write_text(f"step,train_seconds,pairs_seen\n1,1.0,40\n10,{seconds},400\n")
        (d / "curve.csv").write_text("point,train_seconds," + ",".join(bench.METRICS) + "\n"
                                     f"0,0.0,0.4,0.99,1.4\n1,{seconds},0.5,0.9,1.4\n")


def test_collect_and_table_over_two_seeds(tmp_path):
    runs = {}
    for seed, shift in ((1, 0.0), (2, 0.1)):
        fake_run(tmp_path / str(seed), shift)
        runs[seed] = bench.collect(tmp_path / str(seed))
    assert runs[1]["win_rate"]["spo_vs_dpo"]["oracle_aesthetic"] == pytest.approx(0.7)  # 1 - dpo_vs_spo
    assert runs[2]["training"]["dpo"] == {"train_seconds": 96.0, "pairs_seen": 400.0, "optimizer_steps": 10.0}
    bench.write_outputs(runs, tmp_path / "out")
    table = (tmp_path / "out/table.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| oracle_aesthetic"))
    # base 0.4 and 0.5: mean 0.45, sample std 0.0707; SPO vs DPO 0.7 and 0.6
    assert row.split(" | ")[1] == "0.450 ± 0.071" and row.split(" | ")[-1] == "0.650 ± 0.071 |"
    assert sorted(p.name for p in (tmp_path / "out/curves").iterdir()) == \
        ["dpo_seed1.csv", "dpo_seed2.csv", "spo_seed1.csv", "spo_seed2.csv"]
    assert (tmp_path / "out/curves.png").stat().st_size > 1000
    assert set(json.loads((tmp_path / "out/results.json").read_text())) == {"1", "2"}
