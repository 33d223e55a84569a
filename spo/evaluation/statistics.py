"""Evaluation statistics: means and paired win rates with prompt-clustered bootstrap intervals.

Every model samples the same (prompt_index, seed) list, so comparisons are paired: rows are aligned by
(prompt_index, seed), never by position. Several seeds of one prompt are not independent (the prompt
explains much of the score), so intervals come from a *cluster* bootstrap: each resample draws whole
prompts with replacement and keeps all their seeds. The interval is the percentile interval of the
resampled statistic.

Resampling is vectorised: a resample is a vector of cluster multiplicities W (how often each prompt was
drawn), and the resampled mean of any column is (W @ cluster_sums) / (W @ cluster_sizes). One W matrix
serves every column at once, so `summarise` costs one matrix product, and for the same (groups, seed,
n_resamples) `summarise`, `bootstrap_mean` and `paired_win_rate` draw the same resamples: their intervals
agree (to rounding).

Comparison pairs (`comparison_pairs`): the baseline counts as the first model, the others keep their order
in `models`; every model is compared with every model before it, named "<later>_vs_<earlier>". So
models ["base", "spo", "dpo"] give spo_vs_base, dpo_vs_base, dpo_vs_spo: baseline pairs first, "a_vs_b"
reads "a (newer) against b", the win rate is P(a scores higher than b) and delta = mean(a) - mean(b).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

KEY = ("prompt_index", "seed")  # identifies one paired sample across models
_MAX_CELLS = 4_000_000  # resample-weight entries per chunk (memory bound: 32 MB of float64)


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float
    n: int  # number of samples (not of prompts)


# --- bootstrap core ---------------------------------------------------------------------------------

def _check_confidence(confidence: float, n_resamples: int) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r}")


def _cluster_ids(groups: np.ndarray | None, n: int) -> np.ndarray:
    """Cluster index in [0, P) of each sample; every sample its own cluster without groups."""
    if groups is None:
        return np.arange(n)
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups has shape {groups.shape}, values have shape ({n},)")
    return np.unique(groups, return_inverse=True)[1].reshape(-1)


def _bootstrap_columns(columns: np.ndarray, clusters: np.ndarray, *, confidence: float, n_resamples: int,
                       seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """columns: (n, K) finite values; clusters: (n,) ids in [0, P). Returns (mean, low, high), each (K,).

    The resamples depend only on (P, n_resamples, seed), never on the columns, so any subset of columns
    bootstrapped with the same clusters and seed gets the same intervals."""
    n, k = columns.shape
    num_clusters = int(clusters.max()) + 1
    sums = np.zeros((num_clusters, k))
    np.add.at(sums, clusters, columns)
    sizes = np.bincount(clusters, minlength=num_clusters).astype(float)
    means = columns.mean(axis=0)
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_resamples, _MAX_CELLS // num_clusters))
    resampled = np.empty((n_resamples, k))
    for start in range(0, n_resamples, chunk):
        rows = min(chunk, n_resamples - start)
        draws = rng.integers(0, num_clusters, size=(rows, num_clusters))
        if k <= 2:  # few columns: gathering the drawn clusters beats building the weight matrix
            resampled[start:start + rows] = sums[draws].sum(axis=1) / sizes[draws].sum(axis=1)[:, None]
        else:
            flat = (draws + num_clusters * np.arange(rows)[:, None]).ravel()
            weights = np.bincount(flat, minlength=rows * num_clusters).reshape(rows, num_clusters).astype(float)
            resampled[start:start + rows] = (weights @ sums) / (weights @ sizes)[:, None]
    alpha = 1.0 - confidence
    low, high = np.quantile(resampled, [alpha / 2, 1 - alpha / 2], axis=0)
    # a resampled mean lies within the data's range; clipping only removes rounding noise
    low = np.clip(low, columns.min(axis=0), columns.max(axis=0))
    high = np.clip(high, columns.min(axis=0), columns.max(axis=0))
    return means, low, high


def _as_values(values: np.ndarray, name: str) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if values.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {values.shape}")
    if values.size == 0:
        raise ValueError(f"{name} is empty")
    bad = ~np.isfinite(values)
    if bad.any():
        raise ValueError(f"{name} has {int(bad.sum())} non-finite value(s) (NaN/inf), first at index "
                         f"{int(np.flatnonzero(bad)[0])}")
    return values


def bootstrap_mean(values: np.ndarray, *, groups: np.ndarray | None = None, confidence: float = 0.95,
                   n_resamples: int = 2000, seed: int = 0) -> Estimate:
    """Mean of `values` with a percentile-bootstrap interval. With `groups` (e.g. prompt ids, one per
    value) whole groups are resampled (cluster bootstrap); without, single values are."""
    _check_confidence(confidence, n_resamples)
    values = _as_values(values, "values")
    clusters = _cluster_ids(groups, values.size)
    mean, low, high = _bootstrap_columns(values[:, None], clusters, confidence=confidence,
                                         n_resamples=n_resamples, seed=seed)
    return Estimate(value=float(mean[0]), low=float(low[0]), high=float(high[0]), n=int(values.size))


def wins(candidate: np.ndarray, baseline: np.ndarray) -> np.ndarray:
    """Per pair: 1 where candidate scores higher, 0 where lower, 0.5 on a tie."""
    return (candidate > baseline).astype(float) + 0.5 * (candidate == baseline)


def paired_win_rate(candidate: np.ndarray, baseline: np.ndarray, *, groups: np.ndarray | None = None,
                    confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> Estimate:
    """Share of pairs the candidate wins (ties count ½), with the (cluster) bootstrap interval of
    `bootstrap_mean`. candidate[i] and baseline[i] must be the same (prompt, seed)."""
    candidate, baseline = np.asarray(candidate), np.asarray(baseline)
    if candidate.shape != baseline.shape:
        raise ValueError(f"paired scores differ in shape: candidate {candidate.shape} vs baseline {baseline.shape}")
    candidate = _as_values(candidate, "candidate")
    baseline = _as_values(baseline, "baseline")
    return bootstrap_mean(wins(candidate, baseline), groups=groups, confidence=confidence,
                          n_resamples=n_resamples, seed=seed)


# --- score tables -------------------------------------------------------------------------------------

def comparison_pairs(models: Sequence[str], baseline: str = "base") -> list[tuple[str, str]]:
    """(a, b) pairs, named "<a>_vs_<b>": each non-baseline model against the baseline, then each pair
    of non-baseline models with a the later one in `models`."""
    others = [m for m in models if m != baseline]
    pairs = [(m, baseline) for m in others]
    pairs += [(others[j], others[i]) for j in range(len(others)) for i in range(j)]
    return pairs


def pair_name(a: str, b: str) -> str:
    return f"{a}_vs_{b}"


def validate_table(table: pd.DataFrame, *, metrics: Sequence[str], models: Sequence[str]) -> pd.DataFrame:
    """The rows of `models`, sorted by (model order, prompt_index, seed), after checking that every model
    has exactly the same (prompt_index, seed) rows, once each, with finite scores for every metric (and,
    where a `prompt` column exists, the same prompt text). Raises ValueError naming the culprit."""
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"the score table must be a pandas DataFrame, got {type(table).__name__}")
    models, metrics = list(models), list(metrics)
    if not models:
        raise ValueError("no models given")
    if not metrics:
        raise ValueError("no metrics given")
    for kind, names in (("model", models), ("metric", metrics)):
        dup = sorted({x for x in names if names.count(x) > 1})
        if dup:
            raise ValueError(f"{kind} names given more than once: {dup}")
    missing = [c for c in ("model", *KEY, *metrics) if c not in table.columns]
    if missing:
        raise ValueError(f"score table lacks column(s) {missing}; it has {list(table.columns)}")
    for metric in metrics:
        if not pd.api.types.is_numeric_dtype(table[metric]) or pd.api.types.is_bool_dtype(table[metric]):
            raise ValueError(f"metric column {metric!r} is not numeric (dtype {table[metric].dtype})")
    for col in KEY:
        if table[col].isna().any():
            raise ValueError(f"score table has missing {col} values")
    rows = table[table["model"].isin(models)].copy()
    present = set(rows["model"])
    absent = [m for m in models if m not in present]
    if absent:
        raise ValueError(f"score table has no rows for model(s) {absent}; it has {sorted(map(str, set(table['model'])))}")
    dup = rows.duplicated(["model", *KEY], keep=False)
    if dup.any():
        first = rows[dup].iloc[0]
        raise ValueError(f"model {first['model']!r} has {int(dup.sum())} duplicated (prompt_index, seed) rows, "
                         f"e.g. ({first['prompt_index']}, {first['seed']})")
    for metric in metrics:
        values = rows[metric].to_numpy(dtype=float)
        bad = ~np.isfinite(values)
        if bad.any():
            first = rows[bad].iloc[0]
            raise ValueError(f"metric {metric!r} has {int(bad.sum())} non-finite score(s) (NaN/inf), e.g. model "
                             f"{first['model']!r} at (prompt_index, seed) = ({first['prompt_index']}, {first['seed']})")
    keys = {m: set(map(tuple, rows.loc[rows["model"] == m, list(KEY)].to_numpy().tolist())) for m in models}
    union = set().union(*keys.values())
    for m in models:
        lacking = union - keys[m]
        if lacking:
            example = min(lacking)
            owner = next(o for o in models if example in keys[o])
            raise ValueError(f"unpaired rows: model {m!r} lacks {len(lacking)} (prompt_index, seed) row(s) other "
                             f"models have, e.g. {example} (present for {owner!r})")
    rows["_order"] = rows["model"].map({m: i for i, m in enumerate(models)})
    rows = rows.sort_values(["_order", *KEY], kind="stable").drop(columns="_order").reset_index(drop=True)
    if "prompt" in rows.columns:
        per_model = rows["prompt"].to_numpy().reshape(len(models), -1)
        differs = (per_model != per_model[0]).any(axis=0)
        if differs.any():
            i = int(np.flatnonzero(differs)[0])
            key = tuple(rows.loc[i, list(KEY)])
            raise ValueError(f"misaligned rows: (prompt_index, seed) = {key} has different prompt text across "
                             f"models: {dict(zip(models, per_model[:, i].tolist()))}")
    return rows


def summarise(table: pd.DataFrame, *, metrics: Sequence[str], models: Sequence[str], baseline: str = "base",
              confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> dict:
    """Means, paired win rates and mean differences with prompt-clustered bootstrap intervals:

        {"models": {model: {metric: mean, metric_ci_low, metric_ci_high}},
         "win_rate": {"a_vs_b": {metric: rate, metric_ci_low, metric_ci_high}},
         "delta": {"a_vs_b": {metric: mean(a) - mean(b), metric_ci_low, metric_ci_high}},
         "num_samples": samples per model, "num_prompts": distinct prompts,
         "confidence": confidence, "n_resamples": n_resamples}

    Pairs as `comparison_pairs`. All statistics share one set of resamples (clusters = prompt_index)."""
    _check_confidence(confidence, n_resamples)
    models, metrics = list(models), list(metrics)
    if baseline not in models:
        raise ValueError(f"baseline {baseline!r} is not among the models {models}")
    rows = validate_table(table, metrics=metrics, models=models)
    n = len(rows) // len(models)
    scores = rows[metrics].to_numpy(dtype=float).reshape(len(models), n, len(metrics))  # (model, sample, metric)
    clusters = _cluster_ids(rows["prompt_index"].to_numpy()[:n], n)
    pairs = comparison_pairs(models, baseline)
    index = {m: i for i, m in enumerate(models)}
    blocks = [scores[i] for i in range(len(models))]
    blocks += [wins(scores[index[a]], scores[index[b]]) for a, b in pairs]
    blocks += [scores[index[a]] - scores[index[b]] for a, b in pairs]
    mean, low, high = _bootstrap_columns(np.concatenate(blocks, axis=1), clusters, confidence=confidence,
                                         n_resamples=n_resamples, seed=seed)
    shape = (-1, len(metrics))
    mean, low, high = mean.reshape(shape), low.reshape(shape), high.reshape(shape)

    def entry(block: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for j, metric in enumerate(metrics):
            out[metric] = float(mean[block, j])
            out[f"{metric}_ci_low"] = float(low[block, j])
            out[f"{metric}_ci_high"] = float(high[block, j])
        return out

    num_models, num_pairs = len(models), len(pairs)
    return {
        "models": {m: entry(i) for i, m in enumerate(models)},
        "win_rate": {pair_name(a, b): entry(num_models + p) for p, (a, b) in enumerate(pairs)},
        "delta": {pair_name(a, b): entry(num_models + num_pairs + p) for p, (a, b) in enumerate(pairs)},
        "num_samples": int(n),
        "num_prompts": int(clusters.max()) + 1,
        "confidence": float(confidence),
        "n_resamples": int(n_resamples),
    }


# --- metric names for trackers --------------------------------------------------------------------------

def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def flat_metrics(summary: Mapping) -> dict[str, float]:
    """Every finite number of `summary`, keyed by its path joined with "." (e.g. "win_rate.spo_vs_base.pickscore")."""
    out: dict[str, float] = {}

    def walk(node: Mapping, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping):
                walk(value, f"{name}.")
            elif _is_number(value) and math.isfinite(float(value)):
                out[name] = float(value)

    walk(summary, "")
    return out


def model_metrics(summary: Mapping, model: str, baseline: str = "base") -> dict[str, float]:
    """One model's metrics under the same names for every model (so MLflow's compare view lines them up):
    <metric>, <metric>_ci_low, <metric>_ci_high, and where the model is not the baseline
    win_rate_vs_<baseline>.<metric>[_ci_low|_ci_high] and delta_vs_<baseline>.<metric>[_ci_low|_ci_high]."""
    if model not in summary["models"]:
        raise ValueError(f"model {model!r} is not in the summary; it has {list(summary['models'])}")
    out = {k: float(v) for k, v in summary["models"][model].items() if _is_number(v) and math.isfinite(v)}
    pair = pair_name(model, baseline)
    for section, prefix in (("win_rate", "win_rate_vs_"), ("delta", "delta_vs_")):
        for k, v in summary.get(section, {}).get(pair, {}).items():
            if _is_number(v) and math.isfinite(v):
                out[f"{prefix}{baseline}.{k}"] = float(v)
    return out
