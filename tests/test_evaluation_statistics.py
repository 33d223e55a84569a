"""spo.evaluation.statistics: bootstrap intervals and paired win rates against known answers."""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import pytest

from spo.evaluation.statistics import (
    Estimate,
    bootstrap_mean,
    comparison_pairs,
    flat_metrics,
    model_metrics,
    paired_win_rate,
    summarise,
)

MODELS = ["base", "spo", "dpo"]


def score_table(num_prompts: int = 20, seeds=(0, 1), metrics=("pickscore", "aesthetic"), *, seed: int = 0,
                shift: dict[str, float] | None = None) -> pd.DataFrame:
    """base ~ N(0, 1) per (prompt, seed); every other model = base + shift[model] (default 0)."""
    rng = np.random.default_rng(seed)
    keys = pd.DataFrame([(p, s) for p in range(num_prompts) for s in seeds], columns=["prompt_index", "seed"])
    base = {m: rng.normal(size=len(keys)) for m in metrics}
    frames = []
    for model in MODELS:
        frame = keys.copy()
        frame.insert(0, "model", model)
        frame.insert(2, "prompt", [f"prompt {p}" for p in frame["prompt_index"]])
        for m in metrics:
            frame[m] = base[m] + (shift or {}).get(model, 0.0)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def width(e: Estimate) -> float:
    return e.high - e.low


# --- bootstrap_mean / paired_win_rate ------------------------------------------------------------------

def test_win_rate_of_a_uniformly_better_candidate_is_one_with_a_degenerate_interval():
    baseline = np.random.default_rng(1).normal(size=200)
    groups = np.repeat(np.arange(50), 4)
    for g in (None, groups):
        assert paired_win_rate(baseline + 1, baseline, groups=g) == Estimate(1.0, 1.0, 1.0, 200)
        assert paired_win_rate(baseline - 1, baseline, groups=g) == Estimate(0.0, 0.0, 0.0, 200)


def test_ties_count_half():
    x = np.random.default_rng(2).normal(size=100)
    assert paired_win_rate(x, x.copy()) == Estimate(0.5, 0.5, 0.5, 100)
    wr = paired_win_rate(np.array([2.0, 1.0, 3.0, 0.0]), np.array([1.0, 1.0, 4.0, -1.0]))
    assert wr.value == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert wr.low <= wr.value <= wr.high and wr.n == 4


def test_normal_sample_interval_covers_the_mean_and_has_the_textbook_width():
    mu, sigma, n = 3.0, 2.0, 4000
    x = np.random.default_rng(3).normal(mu, sigma, size=n)
    e = bootstrap_mean(x, seed=5)
    assert e.low < mu < e.high
    assert e.value == pytest.approx(x.mean())
    assert width(e) == pytest.approx(2 * 1.96 * sigma / math.sqrt(n), rel=0.10)
    narrow = bootstrap_mean(x, seed=5, confidence=0.5)  # ±0.674σ/√n
    assert width(narrow) == pytest.approx(2 * 0.674 * sigma / math.sqrt(n), rel=0.10)


def test_cluster_bootstrap_widens_by_sqrt_of_seeds_per_prompt():
    prompts, seeds, sigma = 800, 4, 1.0
    per_prompt = np.random.default_rng(4).normal(0.0, sigma, size=prompts)
    x = np.repeat(per_prompt, seeds)  # the seeds of a prompt score identically: 4 copies of one sample
    groups = np.repeat(np.arange(prompts), seeds)
    naive, cluster = bootstrap_mean(x, seed=1), bootstrap_mean(x, groups=groups, seed=1)
    assert naive.value == cluster.value
    assert width(cluster) / width(naive) == pytest.approx(math.sqrt(seeds), rel=0.10)
    assert width(cluster) == pytest.approx(2 * 1.96 * sigma / math.sqrt(prompts), rel=0.10)
    assert cluster.n == prompts * seeds


def test_group_labels_need_not_be_contiguous_or_numeric():
    x = np.random.default_rng(5).normal(size=60)
    ids = np.repeat(np.arange(20), 3)
    labels = np.repeat(np.array([f"p{i:02d}" for i in range(20)]), 3)  # same order as the ids
    assert bootstrap_mean(x, groups=ids * 7 + 3, seed=2) == bootstrap_mean(x, groups=labels, seed=2)


def test_deterministic_given_seed():
    x = np.random.default_rng(6).normal(size=300)
    groups = np.repeat(np.arange(100), 3)
    assert bootstrap_mean(x, groups=groups, seed=11) == bootstrap_mean(x, groups=groups, seed=11)
    assert bootstrap_mean(x, groups=groups, seed=11) != bootstrap_mean(x, groups=groups, seed=12)
    y = x + np.random.default_rng(7).normal(size=300)
    assert paired_win_rate(y, x, groups=groups, seed=3) == paired_win_rate(y, x, groups=groups, seed=3)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"candidate \(3,\) vs baseline \(4,\)"):
        paired_win_rate(np.zeros(3), np.zeros(4))


@pytest.mark.parametrize("bad, match", [
    (np.array([1.0, np.nan, 2.0]), "non-finite.*index 1"),
    (np.array([]), "empty"),
    (np.zeros((2, 2)), "1-D"),
])
def test_bad_values_are_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_mean(bad)


def test_bad_groups_and_settings_are_errors():
    with pytest.raises(ValueError, match="groups has shape"):
        bootstrap_mean(np.zeros(4), groups=np.zeros(3))
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_mean(np.zeros(4), confidence=95)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_mean(np.zeros(4), n_resamples=0)


# --- summarise -----------------------------------------------------------------------------------------

def test_pairs_rule():
    assert comparison_pairs(MODELS, "base") == [("spo", "base"), ("dpo", "base"), ("dpo", "spo")]
    assert comparison_pairs(["spo", "base", "dpo"], "base") == [("spo", "base"), ("dpo", "base"), ("dpo", "spo")]
    assert comparison_pairs(["base"], "base") == []


def test_summary_known_answers():
    table = score_table(shift={"spo": 1.0})  # spo = base + 1; dpo = base (all ties)
    s = summarise(table, metrics=["pickscore", "aesthetic"], models=MODELS)
    assert list(s["win_rate"]) == ["spo_vs_base", "dpo_vs_base", "dpo_vs_spo"] == list(s["delta"])
    assert s["num_samples"] == 40 and s["num_prompts"] == 20
    for m in ("pickscore", "aesthetic"):
        assert s["win_rate"]["spo_vs_base"][m] == s["win_rate"]["spo_vs_base"][f"{m}_ci_low"] == 1.0
        assert s["win_rate"]["spo_vs_base"][f"{m}_ci_high"] == 1.0
        assert s["win_rate"]["dpo_vs_base"][m] == 0.5 == s["win_rate"]["dpo_vs_base"][f"{m}_ci_high"]
        assert s["win_rate"]["dpo_vs_spo"][m] == 0.0
        assert s["delta"]["spo_vs_base"][m] == pytest.approx(1.0)
        assert s["delta"]["spo_vs_base"][f"{m}_ci_low"] == pytest.approx(1.0)
        assert s["delta"]["dpo_vs_spo"][m] == pytest.approx(-1.0)
        base_mean = table.loc[table.model == "base", m].mean()
        assert s["models"]["base"][m] == pytest.approx(base_mean)
        assert s["models"]["spo"][m] == pytest.approx(base_mean + 1)
        assert s["models"]["base"][f"{m}_ci_low"] < base_mean < s["models"]["base"][f"{m}_ci_high"]


def test_summary_intervals_are_the_prompt_cluster_bootstrap():
    table = score_table(num_prompts=30, seeds=(0, 1, 2), shift={"spo": 0.3, "dpo": -0.1}, seed=9)
    table.loc[table.model == "spo", "pickscore"] += np.random.default_rng(1).normal(size=90)
    s = summarise(table, metrics=["pickscore"], models=MODELS, seed=4)
    rows = table[table.model == "spo"].sort_values(["prompt_index", "seed"])
    base = table[table.model == "base"].sort_values(["prompt_index", "seed"])
    groups = rows["prompt_index"].to_numpy()
    e = bootstrap_mean(rows["pickscore"].to_numpy(), groups=groups, seed=4)
    assert (s["models"]["spo"]["pickscore_ci_low"], s["models"]["spo"]["pickscore_ci_high"]) == \
        pytest.approx((e.low, e.high), abs=1e-12)
    wr = paired_win_rate(rows["pickscore"].to_numpy(), base["pickscore"].to_numpy(), groups=groups, seed=4)
    got = s["win_rate"]["spo_vs_base"]
    assert (got["pickscore"], got["pickscore_ci_low"], got["pickscore_ci_high"]) == \
        pytest.approx((wr.value, wr.low, wr.high), abs=1e-12)


def test_rows_are_paired_by_key_not_position():
    table = score_table(shift={"spo": 1.0})
    shuffled = table.sample(frac=1.0, random_state=3).reset_index(drop=True)
    # base rows in reverse order: pairing by position would compare different samples
    base = shuffled[shuffled.model == "base"].sort_values(["prompt_index", "seed"], ascending=False)
    shuffled = pd.concat([base, shuffled[shuffled.model != "base"]], ignore_index=True)
    s = summarise(shuffled, metrics=["pickscore"], models=MODELS)
    assert s["win_rate"]["spo_vs_base"]["pickscore"] == 1.0
    assert s["win_rate"]["dpo_vs_base"]["pickscore"] == 0.5
    assert s == summarise(table, metrics=["pickscore"], models=MODELS)


def test_summary_is_deterministic_and_json_able():
    import json

    table = score_table(seed=2, shift={"spo": 0.2})
    a = summarise(table, metrics=["pickscore"], models=MODELS, seed=1)
    assert a == summarise(table, metrics=["pickscore"], models=MODELS, seed=1)
    assert a != summarise(table, metrics=["pickscore"], models=MODELS, seed=2)
    assert json.loads(json.dumps(a)) == a


def drop_row(table, model, prompt_index, seed):
    return table[~((table.model == model) & (table.prompt_index == prompt_index) & (table.seed == seed))]


@pytest.mark.parametrize("mutate, match", [
    (lambda t: t.drop(columns="aesthetic"), r"lacks column\(s\) \['aesthetic'\]"),
    (lambda t: t.drop(columns="seed"), r"lacks column\(s\) \['seed'\]"),
    (lambda t: t[t.model != "dpo"], r"no rows for model\(s\) \['dpo'\]"),
    (lambda t: t.assign(aesthetic=np.where((t.model == "spo") & (t.prompt_index == 3) & (t.seed == 1), np.nan,
                                           t.aesthetic)),
     r"metric 'aesthetic' has 1 non-finite.*model 'spo' at \(prompt_index, seed\) = \(3, 1\)"),
    (lambda t: drop_row(t, "spo", 4, 0), r"model 'spo' lacks 1 .*\(4, 0\)"),
    (lambda t: drop_row(t, "base", 7, 1), r"model 'base' lacks 1 .*\(7, 1\)"),
    (lambda t: pd.concat([t, t[(t.model == "dpo")].head(1)]), r"model 'dpo' has 2 duplicated .*\(0, 0\)"),
    (lambda t: t.assign(prompt=np.where((t.model == "dpo") & (t.prompt_index == 2), "other", t.prompt)),
     r"\(2, 0\) has different prompt text"),
    (lambda t: t.assign(pickscore="x"), "'pickscore' is not numeric"),
])
def test_invalid_tables_name_the_culprit(mutate, match):
    table = mutate(score_table())
    with pytest.raises(ValueError, match=match):
        summarise(table, metrics=["pickscore", "aesthetic"], models=MODELS)


def test_baseline_must_be_a_model():
    with pytest.raises(ValueError, match="baseline 'sd15'"):
        summarise(score_table(), metrics=["pickscore"], models=MODELS, baseline="sd15")


def test_other_models_in_the_table_are_ignored():
    table = score_table()
    extra = table[table.model == "base"].assign(model="unused").iloc[:-1]  # unpaired, but not asked for
    s = summarise(pd.concat([table, extra]), metrics=["pickscore"], models=["base", "spo"])
    assert list(s["models"]) == ["base", "spo"] and list(s["win_rate"]) == ["spo_vs_base"]


def test_vectorised_speed():
    rng = np.random.default_rng(0)
    metrics = ["pickscore", "hpsv21", "imagereward", "aesthetic", "clip_score"]
    keys = pd.DataFrame({"prompt_index": np.arange(500), "seed": 0})
    table = pd.concat([keys.assign(model=m, **{k: rng.normal(size=500) for k in metrics}) for m in MODELS])
    start = time.perf_counter()
    summarise(table, metrics=metrics, models=MODELS, n_resamples=2000)
    assert time.perf_counter() - start < 1.0


# --- metric names ----------------------------------------------------------------------------------------

def test_flat_metrics_dotted_and_finite_only():
    s = summarise(score_table(shift={"spo": 1.0}), metrics=["pickscore"], models=MODELS)
    flat = flat_metrics({**s, "note": "text", "flag": True, "bad": float("nan")})
    assert flat["win_rate.spo_vs_base.pickscore"] == 1.0
    assert flat["models.base.pickscore_ci_low"] == s["models"]["base"]["pickscore_ci_low"]
    assert flat["num_samples"] == 40.0
    assert "note" not in flat and "flag" not in flat and "bad" not in flat
    assert all(isinstance(v, float) and math.isfinite(v) for v in flat.values())


def test_model_metrics_share_names_across_models():
    s = summarise(score_table(shift={"spo": 1.0}), metrics=["pickscore", "aesthetic"], models=MODELS)
    spo, dpo, base = (model_metrics(s, m) for m in ("spo", "dpo", "base"))
    assert set(spo) == set(dpo)
    assert set(base) == {f"{m}{suffix}" for m in ("pickscore", "aesthetic") for suffix in ("", "_ci_low", "_ci_high")}
    assert set(base) < set(spo)
    assert spo["win_rate_vs_base.pickscore"] == 1.0 and spo["win_rate_vs_base.pickscore_ci_low"] == 1.0
    assert dpo["win_rate_vs_base.aesthetic"] == 0.5
    assert spo["delta_vs_base.pickscore"] == pytest.approx(1.0)
    assert spo["pickscore_ci_high"] == s["models"]["spo"]["pickscore_ci_high"]
    with pytest.raises(ValueError, match="'sdxl'"):
        model_metrics(s, "sdxl")
