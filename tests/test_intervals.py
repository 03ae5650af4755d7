"""Numbers over seeds (`ccp.evaluation.intervals`) on constructed records: t intervals against a
hand computation, aggregation, the tables and Fig. 9 drawn from it, claims' verdicts, the
sampling-vs-seed spread table, and KID against torchmetrics and a hand-written MMD."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.stats
import torch
from matplotlib.collections import LineCollection

from ccp.config import ConfigError
from ccp.evaluation.fid import kernel_inception_distance, real_features, real_statistics
from ccp.evaluation.figures import fidelity, fidelity_control_scatter
from ccp.evaluation.intervals import (
    ClaimConfigError,
    aggregate_records,
    check_claims,
    claims_markdown,
    interval_note,
    t_interval,
)
from ccp.evaluation.tables import spread_rows, write_tables

SEEDS = (0, 1, 2)
# per seed: (ours, textual_inversion, dreambooth) numbers chosen by hand
FID = {0: (120.0, 700.0, 400.0), 1: (130.0, 720.0, 380.0), 2: (125.0, 690.0, 450.0)}
BEST = {0: ((110.0, 1.5), (650.0, 1.0), (200.0, 1.0)), 1: ((118.0, 1.5), (660.0, 1.0), (210.0, 2.0)),
        2: ((121.0, 1.0), (640.0, 1.0), (190.0, 1.0))}
ALIGN = {0: (0.98, 0.80, 0.85), 1: (0.97, 0.75, 0.90), 2: (0.99, 0.82, 0.83)}
DRIFT = {0: (0.0, 0.0, 150.0), 1: (0.0, 0.0, 160.0), 2: (0.0, 0.0, 140.0)}
SHARE = {0: (0.08, 0.08, 0.33), 1: (0.07, 0.07, 0.35), 2: (0.09, 0.09, 0.31)}
ROWS = ("ours", "textual_inversion", "dreambooth")


def hand_interval(values):
    """The 95% Student t interval written out: mean ± t_{0.975, n-1} s / sqrt(n)."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    s = math.sqrt(((x - x.mean()) ** 2).sum() / (n - 1))
    half = scipy.stats.t.ppf(0.975, n - 1) * s / math.sqrt(n)
    return x.mean(), x.mean() - half, x.mean() + half


def records_of(seed: int) -> list[dict]:
    out = []
    for i, row in enumerate(ROWS):
        weight = "concept_weight" if row == "ours" else "control_weight"
        best_fid, best_weight = BEST[seed][i]
        other = 1.0 if best_weight != 1.0 else 2.0
        out.append({
            "method": row, "dataset": "bold", "params": 1000 * (i + 1), "fid": FID[seed][i],
            "kid": FID[seed][i] / 1e5, "kid_std": 0.001,
            "text_alignment": ALIGN[seed][i], "spatial_alignment": None,
            "drift": {"fid": DRIFT[seed][i], "style_share": SHARE[seed][i], "prior_style_share": 0.078 + 0.001 * seed,
                      "num_samples": 359},
            "fid_search": {"weight": weight, "fid": {f"{best_weight:g}": best_fid, f"{other:g}": best_fid + 50.0},
                           "best_weight": best_weight, "best_fid": best_fid},
        })
    return out


PER_SEED = {s: records_of(s) for s in SEEDS}


def test_t_interval_matches_a_hand_computation_and_scipy():
    values = [1.0, 2.0, 4.0]
    iv = t_interval(values)
    mean, low, high = hand_interval(values)
    assert iv.mean == pytest.approx(7 / 3) and iv.n == 3
    assert iv.std == pytest.approx(math.sqrt(7 / 3))  # sum of squares 42/9 over n - 1 = 2
    assert (iv.low, iv.high) == (pytest.approx(low), pytest.approx(high))
    # scipy's own interval of a mean, and the t quantile of 2 degrees of freedom written out
    assert (iv.low, iv.high) == pytest.approx(scipy.stats.t.interval(0.95, 2, loc=7 / 3, scale=math.sqrt(7 / 3) / math.sqrt(3)))
    assert iv.half_width == pytest.approx(4.302652729911275 * math.sqrt(7 / 3) / math.sqrt(3))
    one = t_interval([5.0])
    assert one.mean == 5.0 and one.low is None and one.high is None and one.half_width is None
    with pytest.raises(ValueError, match="at least one value"):
        t_interval([])


def test_t_interval_covers_the_true_mean_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    trials = 4000
    hits = 0
    for _ in range(trials):
        iv = t_interval(rng.normal(10.0, 3.0, size=4))
        hits += iv.low <= 10.0 <= iv.high
    # binomial sd of the coverage at 4,000 trials: 0.0034
    assert abs(hits / trials - 0.95) < 0.012


def test_aggregate_records_means_intervals_and_best_weights():
    agg = {r["method"]: r for r in aggregate_records(PER_SEED)}
    assert list(agg) == list(ROWS)
    for i, row in enumerate(ROWS):
        record = agg[row]
        for path, values in (("fid", [FID[s][i] for s in SEEDS]), ("text_alignment", [ALIGN[s][i] for s in SEEDS]),
                             ("drift.style_share", [SHARE[s][i] for s in SEEDS]),
                             ("fid_search.best_fid", [BEST[s][i][0] for s in SEEDS])):
            mean, low, high = hand_interval(values)
            iv = record["intervals"][path]
            assert (iv["mean"], iv["low"], iv["high"]) == (pytest.approx(mean), pytest.approx(low), pytest.approx(high))
            assert record["per_seed"][path] == {str(s): v for s, v in zip(SEEDS, values)}
        assert record["fid"] == pytest.approx(np.mean([FID[s][i] for s in SEEDS]))
        assert record["drift"]["num_samples"] == 359 and record["params"] == 1000 * (i + 1)
    # a seed's own best FID, whatever weight it chose; the weight most seeds chose
    assert agg["ours"]["fid_search"]["best_fid"] == pytest.approx((110 + 118 + 121) / 3)
    assert agg["ours"]["fid_search"]["best_weights"] == [1.5, 1.5, 1.0]
    assert agg["ours"]["fid_search"]["best_weight"] == 1.5
    assert agg["dreambooth"]["fid_search"]["best_weights"] == [1.0, 2.0, 1.0]
    with pytest.raises(ValueError, match="not measured in every seed"):
        aggregate_records({0: records_of(0), 1: records_of(1)[:2]})


def test_tables_over_seeds_show_mean_and_interval_with_the_footnote(tmp_path):
    records = aggregate_records(PER_SEED)
    paths = write_tables(records, tmp_path, datasets=["bold"], table2_dataset="bold", note=interval_note(SEEDS))
    md1 = paths["table1.md"].read_text()
    mean, low, high = hand_interval([FID[s][0] for s in SEEDS])
    assert f"| Ours | 1K | {mean:.2f} [{low:.2f}, {high:.2f}] |" in md1
    assert "Student t over seeds" in md1 and "3 seeds [0, 1, 2]" in md1
    kmean, klow, khigh = hand_interval([FID[s][0] / 1e5 for s in SEEDS])
    assert f"{kmean:.3g} [{klow:.3g}, {khigh:.3g}]" in md1  # KID, 3 significant digits, an interval over seeds
    rows = json.loads(paths["table1.json"].read_text())["rows"]
    ours = next(r for r in rows if r["method"] == "ours")
    assert ours["fid_bold_low"] == pytest.approx(low) and ours["fid_bold_high"] == pytest.approx(high)
    assert "fid_bold_low" in paths["table1.csv"].read_text().splitlines()[0]
    amean, alow, ahigh = hand_interval([ALIGN[s][1] for s in SEEDS])
    assert f"| Textual Inversion | {amean:.2f} [{alow:.2f}, {ahigh:.2f}] |" in paths["table2.md"].read_text()
    drift = paths["table_drift.md"].read_text()
    dmean, dlow, dhigh = hand_interval([DRIFT[s][2] for s in SEEDS])
    assert f"{dmean:.2f} [{dlow:.2f}, {dhigh:.2f}]" in drift and "359 samples each" in drift
    search = paths["table1_weight_search.md"].read_text()
    assert "1 (per seed: 1, 2, 1)" in search  # DreamBooth's seeds chose different weights
    bmean, blow, bhigh = hand_interval([BEST[s][0][0] for s in SEEDS])
    assert f"{bmean:.2f} [{blow:.2f}, {bhigh:.2f}]" in search


def test_claims_verdicts_on_constructed_records():
    claims = [
        {"id": "lowest", "kind": "lowest_in_every_seed", "metric": "fid_search.best_fid", "dataset": "bold",
         "row": "ours", "text": "ours lowest best FID"},
        {"id": "below", "kind": "below", "metric": "fid", "dataset": "bold", "a": "ours", "b": "dreambooth",
         "text": "ours below DreamBooth"},
        {"id": "above", "kind": "above", "metric": "text_alignment", "dataset": "bold", "a": "ours",
         "b": "textual_inversion", "text": "ours above TI"},
        {"id": "align_db_ti", "kind": "above", "metric": "text_alignment", "dataset": "bold", "a": "dreambooth",
         "b": "textual_inversion", "text": "DB above TI"},
        {"id": "nodrift", "kind": "at_most_in_every_seed", "metric": "drift.fid", "dataset": "bold", "value": 1e-6,
         "rows": ["ours", "textual_inversion"], "text": "no drift"},
        {"id": "drift_db", "kind": "at_most_in_every_seed", "metric": "drift.fid", "dataset": "bold", "value": 1e-6,
         "rows": ["ours", "dreambooth"], "text": "no drift incl. DB"},
        {"id": "share", "kind": "above", "metric": "drift.style_share", "b_metric": "drift.prior_style_share",
         "dataset": "bold", "a": "dreambooth", "b": "dreambooth", "text": "DB drifts to the style"},
        {"id": "highest", "kind": "highest_in_every_seed", "metric": "text_alignment", "dataset": "bold",
         "row": "dreambooth", "among": ["textual_inversion"], "text": "DB above TI in every seed"},
    ]
    got = {r.id: r for r in check_claims(claims, PER_SEED)}
    assert got["lowest"].verdict == "holds" and got["lowest"].evidence.startswith("3 of 3 seeds")
    assert got["below"].verdict == "holds"  # [117.6, 132.4] vs [317.5, 502.5]
    assert got["above"].verdict == "holds"
    # DreamBooth's alignment 0.86 [0.77, 0.95] vs Textual Inversion's 0.79 [0.70, 0.88]: overlapping
    assert got["align_db_ti"].verdict == "does not hold" and "overlap" in got["align_db_ti"].evidence
    assert got["nodrift"].verdict == "holds"
    assert got["drift_db"].verdict == "does not hold" and "dreambooth fails in seeds ['0', '1', '2']" in got["drift_db"].evidence
    assert got["share"].verdict == "holds"
    assert got["share"].values["b_metric"] == "drift.prior_style_share"
    # DreamBooth beats Textual Inversion in every seed even though the intervals overlap
    assert got["highest"].verdict == "holds"
    # overlaps: DB 0.86 [0.77, 0.95] and TI 0.79 [0.70, 0.88] overlap; ours' and TI's alignments do not
    overlap = [{"id": "o1", "kind": "overlaps", "metric": "text_alignment", "dataset": "bold", "a": "dreambooth",
                "b": "textual_inversion", "text": "DB within TI"},
               {"id": "o2", "kind": "overlaps", "metric": "text_alignment", "dataset": "bold", "a": "ours",
                "b": "textual_inversion", "text": "ours within TI"},
               {"id": "o3", "kind": "overlaps", "metric": "drift.style_share", "b_metric": "drift.prior_style_share",
                "dataset": "bold", "a": "dreambooth", "b": "dreambooth", "text": "DB's share within the prior's"}]
    o1, o2, o3 = check_claims(overlap, PER_SEED)
    assert o1.verdict == "holds" and o2.verdict == "does not hold" and "disjoint" in o2.evidence
    assert o3.verdict == "does not hold" and o3.values["b_metric"] == "drift.prior_style_share"  # as "share" holds
    assert check_claims(overlap[:1], {0: PER_SEED[0]})[0].verdict == "undecided"

    # one seed where ours is not the lowest: the every-seed claim fails and says where
    changed = {s: [dict(r) for r in rs] for s, rs in PER_SEED.items()}
    changed[2][0] = {**changed[2][0], "fid_search": {**changed[2][0]["fid_search"], "best_fid": 195.0}}
    changed[2][2] = {**changed[2][2], "fid_search": {**changed[2][2]["fid_search"], "best_fid": 190.0}}
    again = check_claims(claims[:1], changed)[0]
    assert again.verdict == "does not hold" and again.evidence.startswith("2 of 3 seeds")
    assert again.values["best"]["2"] == "dreambooth"
    # with one seed there is no interval to compare
    assert check_claims(claims[1:2], {0: PER_SEED[0]})[0].verdict == "undecided"
    md = claims_markdown(list(got.values()), SEEDS)
    assert "| ours lowest best FID | **holds** |" in md and "| DB above TI | **does not hold** |" in md


def test_bad_claims_are_refused_with_every_problem():
    bad = [{"id": "x", "kind": "smallest", "metric": "fid", "dataset": "bold", "text": "?"},
           {"id": "y", "kind": "below", "metric": "fid", "dataset": "bold", "a": "ours", "text": "?"},
           {"id": "z", "kind": "below", "metric": "fid", "dataset": "faces", "a": "ours", "b": "oft", "text": "?"}]
    with pytest.raises(ClaimConfigError) as err:
        check_claims(bad, PER_SEED)
    message = str(err.value)
    assert isinstance(err.value, ConfigError)
    for needle in ("kind='smallest'", "kind below needs `b`", "dataset 'faces' is not in datasets",
                   "rows ['oft'] are not table rows"):
        assert needle in message, needle
    with pytest.raises(ClaimConfigError, match="no spatial_alignment of ours on bold"):
        check_claims([{"id": "s", "kind": "below", "metric": "spatial_alignment", "dataset": "bold", "a": "ours",
                       "b": "dreambooth", "text": "?"}], PER_SEED)


def test_fig9_error_bars_are_the_intervals_over_seeds(tmp_path):
    records = aggregate_records(PER_SEED)
    result = fidelity_control_scatter(records, tmp_path / "fig9.png", dataset="bold")
    assert set(result.errorbars) == set(ROWS)
    ax = result.figure.axes[0]
    segments = [seg for c in ax.collections if isinstance(c, LineCollection) for seg in c.get_segments()]
    for i, row in enumerate(ROWS):
        x_mean, x_low, x_high = hand_interval([-math.log(FID[s][i] / 100) for s in SEEDS])
        y_mean, y_low, y_high = hand_interval([ALIGN[s][i] for s in SEEDS])
        assert result.points[row] == (pytest.approx(x_mean), pytest.approx(y_mean))
        assert result.errorbars[row]["x"] == (pytest.approx(x_low), pytest.approx(x_high))
        assert result.errorbars[row]["y"] == (pytest.approx(y_low), pytest.approx(y_high))
        # the figure itself: a horizontal bar at y_mean from x_low to x_high, a vertical one at x_mean
        horizontal = [s for s in segments if np.allclose(s[:, 1], y_mean) and np.allclose(sorted(s[:, 0]), [x_low, x_high])]
        vertical = [s for s in segments if np.allclose(s[:, 0], x_mean) and np.allclose(sorted(s[:, 1]), [y_low, y_high])]
        assert len(horizontal) == 1 and len(vertical) == 1, row
    assert (tmp_path / "fig9.png").is_file()
    # a single run's records: no error bars
    single = fidelity_control_scatter(PER_SEED[0], tmp_path / "fig9_one.png", dataset="bold")
    assert single.errorbars == {}
    assert not [c for c in single.figure.axes[0].collections if isinstance(c, LineCollection)]
    assert single.points["ours"] == (pytest.approx(fidelity(FID[0][0])), pytest.approx(ALIGN[0][0]))


def test_spread_rows_put_sampling_and_seed_spread_side_by_side():
    first = [dict(r) for r in PER_SEED[0]]
    first[0]["fid_sampling"] = {"sampling_seeds": [0, 1, 2, 3], "fid": [120.0, 124.0, 118.0, 122.0], "num_samples": 359}
    rows = spread_rows(first, aggregate_records(PER_SEED), "bold")
    assert [r["method"] for r in rows] == ["ours"]  # only rows with a sampling spread
    row = rows[0]
    mean, low, high = hand_interval([120.0, 124.0, 118.0, 122.0])
    assert (row["sampling_mean"], row["sampling_low"], row["sampling_high"]) == (
        pytest.approx(mean), pytest.approx(low), pytest.approx(high))
    seed_std = np.std([FID[s][0] for s in SEEDS], ddof=1)
    assert row["seeds_std"] == pytest.approx(seed_std)
    assert row["std_ratio"] == pytest.approx(np.std([120.0, 124.0, 118.0, 122.0], ddof=1) / seed_std)
    assert row["sampling_n"] == 4 and row["seeds_n"] == 3 and row["kid"] == pytest.approx(120.0 / 1e5)


# --- KID -----------------------------------------------------------------------------------------
def poly_mmd_by_hand(x: np.ndarray, y: np.ndarray, degree: int = 3, coef: float = 1.0) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + coef)^degree, the sums written out."""
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + coef) ** degree  # noqa: E731
    m, n = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
            - 2 * kxy.mean())


def test_kid_matches_torchmetrics_and_a_hand_computation():
    from torchmetrics.image.kid import KernelInceptionDistance

    g = torch.Generator().manual_seed(0)
    real = torch.randn(60, 5, generator=g, dtype=torch.float64)
    fake = torch.randn(50, 5, generator=g, dtype=torch.float64) * 1.3 + 0.4

    class Identity(torch.nn.Module):
        def forward(self, x):
            return x

    with pytest.warns(UserWarning):  # torchmetrics warns that it keeps every feature
        metric = KernelInceptionDistance(feature=Identity(), subsets=7, subset_size=25)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    torch.manual_seed(11)
    expected_mean, expected_std = (float(v) for v in metric.compute())
    state = torch.random.get_rng_state()
    mean, std = kernel_inception_distance(real, fake, subsets=7, subset_size=25, seed=11)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's generator is untouched
    assert (mean, std) == (pytest.approx(expected_mean, rel=1e-12), pytest.approx(expected_std, rel=1e-12))
    assert kernel_inception_distance(real, fake, subsets=7, subset_size=25, seed=11) == (mean, std)
    assert kernel_inception_distance(real, fake, subsets=7, subset_size=25, seed=12) != (mean, std)
    # one subset of every sample: a permutation of both sets, so exactly the full-set unbiased MMD
    whole, spread = kernel_inception_distance(real[:50], fake, subsets=1, subset_size=50)
    assert whole == pytest.approx(poly_mmd_by_hand(real[:50].numpy(), fake.numpy()), rel=1e-10) and spread == 0.0
    same, _ = kernel_inception_distance(real[:30], real[30:], subsets=1, subset_size=30)
    assert abs(same) < whole / 5  # two halves of one distribution are near 0; shifted ones are not
    with pytest.raises(ConfigError, match="kid.subset_size <= 50"):
        kernel_inception_distance(real, fake, subsets=2, subset_size=51)


def test_real_features_are_cached_beside_the_fid_statistics(tmp_path, monkeypatch):
    import PIL.Image

    from ccp.evaluation.fid import RandomConvFeatures

    folder = tmp_path / "real"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        PIL.Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    extractor = RandomConvFeatures(0)
    feats = real_features(folder, extractor, resolution=16, cache_dir=tmp_path / "cache", progress=False)
    stats = real_statistics(folder, extractor, resolution=16, cache_dir=tmp_path / "cache", progress=False)
    assert feats.shape == (6, 8) and stats.count == 6
    # the moments FID keeps are those of these very features
    assert torch.allclose(feats.double().sum(0), stats.features_sum, atol=1e-5)
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(cached) == 2 and cached[0].endswith(".features.safetensors")
    assert cached[0].replace(".features", "") == cached[1]  # the same key as the statistics

    calls = []
    monkeypatch.setattr(RandomConvFeatures, "forward", lambda self, images: calls.append(1) or 1 / 0)
    again = real_features(folder, RandomConvFeatures(0), resolution=16, cache_dir=tmp_path / "cache", progress=False)
    assert calls == [] and torch.equal(again, feats)  # read back, not recomputed
