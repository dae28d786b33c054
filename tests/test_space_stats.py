"""Tests of the pruning-space statistics (fxprune.search.space_stats) and their plots, on synthetic numbers whose
answers are known by hand or planted in the data."""
import json

import numpy as np
import pytest

from fxprune.search.space_stats import (
    ParamBucket,
    best_ratio,
    bootstrap_min,
    compare_edfs,
    edf_at,
    edf_curve,
    flops_normalized_weights,
    in_refined_space,
    param_buckets,
    sample_ratio,
)


# ------------------------------------------------------------------------------------------------ edf_at

def test_edf_at_hand_computed():
    errors = [0.1, 0.2, 0.2, 0.4]
    grid = [0.1, 0.15, 0.2, 0.3, 0.5]
    np.testing.assert_allclose(edf_at(errors, grid), [0, 0.25, 0.25, 0.75, 1.0])


def test_edf_at_is_strict_at_ties():
    # Every sample sits exactly on a grid point: it must not count there, only just above.
    errors = np.array([0.3, 0.3, 0.3])
    assert edf_at(errors, [0.3])[0] == 0.0
    assert edf_at(errors, [np.nextafter(0.3, 1.0)])[0] == 1.0


def test_edf_at_respects_and_renormalises_weights():
    errors = [0.1, 0.2, 0.4]
    # Raw weights 2:1:1 are renormalised to 0.5, 0.25, 0.25.
    np.testing.assert_allclose(edf_at(errors, [0.15, 0.3, 0.5], weights=[2, 1, 1]), [0.5, 0.75, 1.0])
    # A zero weight removes a sample from the curve.
    np.testing.assert_allclose(edf_at(errors, [0.15, 0.3], weights=[0, 1, 1]), [0.0, 0.5])


def test_edf_at_keeps_grid_shape_and_accepts_unsorted_input():
    out = edf_at(np.array([0.4, 0.1, 0.2, 0.2]), np.array([[0.05, 0.3], [0.2, 1.0]]))
    assert out.shape == (2, 2)
    np.testing.assert_allclose(out, [[0.0, 0.75], [0.25, 1.0]])


@pytest.mark.parametrize("errors, weights, match", [
    ([], None, "empty"),
    ([0.1, 0.2], [1.0], "same length"),
    ([0.1, 0.2], [1.0, -0.5], ">= 0"),
    ([0.1, 0.2], [0.0, 0.0], "sum to 0"),
    ([0.1, float("nan")], None, "finite"),
])
def test_edf_at_rejects_bad_input(errors, weights, match):
    with pytest.raises(ValueError, match=match):
        edf_at(errors, [0.5], weights)


# ------------------------------------------------------------------------------------------------ edf_curve

def test_edf_curve_steps_and_end():
    x, y = edf_curve([0.4, 0.1, 0.2, 0.2])
    np.testing.assert_allclose(x, [0.1, 0.2, 0.4])
    np.testing.assert_allclose(y, [0.25, 0.75, 1.0])


def test_edf_curve_ends_at_one_and_never_decreases():
    rng = np.random.default_rng(3)
    errors = np.round(rng.uniform(0.05, 0.6, 997), 3)   # rounding makes ties
    weights = rng.uniform(0.0, 1.0, 997)
    for w in (None, weights):
        x, y = edf_curve(errors, w)
        assert y[-1] == 1.0
        assert np.all(np.diff(y) >= 0)
        assert np.all(np.diff(x) > 0)
        # y is F just after each x: the strict EDF a hair above x.
        np.testing.assert_allclose(y, edf_at(errors, np.nextafter(x, np.inf), w))


# ------------------------------------------------------------------------------------- flops normalisation

def test_flops_normalized_weights_two_bins():
    # Range [1, 4] in two bins with the edge at 2.5: {1.0} and {3.0, 3.5, 4.0}.
    w = flops_normalized_weights([1.0, 3.0, 3.5, 4.0], n_bins=2)
    np.testing.assert_allclose(w, [0.5, 1 / 6, 1 / 6, 1 / 6])
    assert w.sum() == pytest.approx(1.0)


def test_flops_normalized_weights_skip_empty_bins_and_sum_to_one():
    # Five bins over [0, 10], only the first and last occupied: each gets half the weight.
    w = flops_normalized_weights([0.0, 0.5, 1.0, 9.5, 10.0], n_bins=5)
    np.testing.assert_allclose(w, [1 / 6, 1 / 6, 1 / 6, 0.25, 0.25])
    rng = np.random.default_rng(0)
    assert flops_normalized_weights(rng.lognormal(size=101), n_bins=7).sum() == pytest.approx(1.0)


def test_flops_normalized_weights_single_value():
    np.testing.assert_allclose(flops_normalized_weights([2e9, 2e9, 2e9, 2e9]), [0.25] * 4)
    np.testing.assert_allclose(flops_normalized_weights([5.0]), [1.0])


def test_flops_normalized_weights_bad_bins():
    with pytest.raises(ValueError, match="n_bins"):
        flops_normalized_weights([1.0, 2.0], n_bins=0)


# ------------------------------------------------------------------------------------------- param buckets

def _known_population():
    """Nine samples, params 1..9 in shuffled input order; buckets of three by params are {1,2,3},
    {4,5,6}, {7,8,9}."""
    params = np.array([5, 1, 9, 3, 7, 2, 8, 4, 6], dtype=float)
    flops = 10.0 * params + 1.0
    error_of_param = {1: 0.50, 2: 0.30, 3: 0.10, 4: 0.20, 5: 0.22, 6: 0.90, 7: 0.40, 8: 0.41, 9: 0.42}
    errors = np.array([error_of_param[int(p)] for p in params])
    return params, flops, errors


def test_param_buckets_counts_contiguity_and_rho():
    params, flops, errors = _known_population()
    buckets = param_buckets(params, flops, errors, n_buckets=3, min_per_bucket=3)
    assert [b.n for b in buckets] == [3, 3, 3]
    assert [b.index for b in buckets] == [0, 1, 2]
    assert sorted(i for b in buckets for i in b.members) == list(range(9))
    for low, high in zip(buckets, buckets[1:]):
        assert params[low.members].max() <= params[high.members].min()
    first = buckets[0]
    assert sorted(params[first.members]) == [1, 2, 3]
    assert (first.params_lo, first.params_hi) == (1.0, 3.0)
    assert first.mean_params == pytest.approx(2.0)
    assert first.mean_flops == pytest.approx(21.0)
    for b in buckets:
        assert b.rho == pytest.approx(b.mean_flops / b.mean_params)


def test_param_buckets_near_equal_sizes():
    rng = np.random.default_rng(1)
    params = rng.uniform(1e6, 5e6, 23)
    buckets = param_buckets(params, params * 3, rng.uniform(size=23), n_buckets=5, min_per_bucket=1)
    assert [b.n for b in buckets] == [5, 5, 5, 4, 4]   # np.array_split of 23 into 5
    for low, high in zip(buckets, buckets[1:]):
        assert low.params_hi <= high.params_lo


@pytest.mark.parametrize("statistic, expected", [
    ("min", [0.10, 0.20, 0.40]),
    ("mean", [0.30, 1.32 / 3, 0.41]),
    ("median", [0.30, 0.22, 0.41]),
    (0.0, [0.10, 0.20, 0.40]),
    (1.0, [0.50, 0.90, 0.42]),
    (0.25, [0.20, 0.21, 0.405]),
])
def test_param_buckets_statistics(statistic, expected):
    params, flops, errors = _known_population()
    buckets = param_buckets(params, flops, errors, n_buckets=3, statistic=statistic)
    np.testing.assert_allclose([b.error_stat for b in buckets], expected)


def test_param_buckets_best_depends_on_statistic():
    params, flops, errors = _known_population()
    # The minimum picks the bucket with one lucky sample, the median the consistently good one.
    assert best_ratio(param_buckets(params, flops, errors, 3, statistic="min")).index == 0
    assert best_ratio(param_buckets(params, flops, errors, 3, statistic="median")).index == 1


def test_param_buckets_min_per_bucket_caps_count():
    params, flops, errors = _known_population()
    assert len(param_buckets(params, flops, errors, n_buckets=10, min_per_bucket=3)) == 3
    assert len(param_buckets(params, flops, errors, n_buckets=10, min_per_bucket=4)) == 2
    assert len(param_buckets(params, flops, errors, n_buckets=2, min_per_bucket=1)) == 2
    # Fewer samples than min_per_bucket still yields one bucket holding them all.
    single = param_buckets(params[:2], flops[:2], errors[:2], n_buckets=10, min_per_bucket=3)
    assert len(single) == 1 and single[0].n == 2


@pytest.mark.parametrize("statistic", ["max", "p10", 1.5, -0.1, True, None])
def test_param_buckets_rejects_unknown_statistic(statistic):
    params, flops, errors = _known_population()
    with pytest.raises(ValueError, match="'min', 'mean', 'median'"):
        param_buckets(params, flops, errors, statistic=statistic)


def test_param_buckets_rejects_mismatched_lengths():
    params, flops, errors = _known_population()
    with pytest.raises(ValueError, match="params and flops and errors"):
        param_buckets(params, flops[:-1], errors)


def test_param_bucket_as_dict_is_json_ready():
    params, flops, errors = _known_population()
    bucket = param_buckets(params, flops, errors, n_buckets=3)[1]
    d = bucket.as_dict()
    assert json.loads(json.dumps(d)) == d
    assert all(type(v) in (int, float, list) for v in d.values())
    assert ParamBucket(**d) == bucket


# ---------------------------------------------------------------------------------------------- best_ratio

def test_best_ratio_finds_planted_optimum():
    """A regime at ~2 GFLOPs where error grows with the squared log-distance of rho from rho0: the best
    bucket's rho must land near rho0."""
    rng = np.random.default_rng(7)
    rho0 = 40.0
    n = 300
    rho = rho0 * np.exp(rng.uniform(np.log(1 / 4), np.log(4), n))
    flops = 2e9 * rng.uniform(0.97, 1.03, n)
    params = flops / rho
    errors = 0.25 + (np.log(rho) - np.log(rho0)) ** 2 + rng.normal(0.0, 0.005, n)
    buckets = param_buckets(params, flops, errors, n_buckets=10)
    best = best_ratio(buckets)
    assert abs(best.rho - rho0) / rho0 < 0.2
    # The winner is not an edge bucket: the planted optimum is inside the sampled range.
    assert 0 < best.index < len(buckets) - 1


def test_best_ratio_ties_prefer_more_samples_then_lower_index():
    def bucket(index, n, stat):
        return ParamBucket(index, 0.0, 1.0, n, 1.0, 1.0, 1.0, stat, [])
    assert best_ratio([bucket(0, 3, 0.2), bucket(1, 4, 0.2), bucket(2, 9, 0.3)]).index == 1
    assert best_ratio([bucket(0, 4, 0.2), bucket(1, 4, 0.2)]).index == 0
    with pytest.raises(ValueError):
        best_ratio([])


# ------------------------------------------------------------------------------------- ratio and refinement

def test_sample_ratio_elementwise_and_scalar():
    np.testing.assert_allclose(sample_ratio([10.0, 30.0], [2.0, 3.0]), [5.0, 10.0])
    assert float(sample_ratio(8.0, 2.0)) == 4.0
    with pytest.raises(ValueError, match="flops and params"):
        sample_ratio([1.0, 2.0, 3.0], [1.0, 2.0])


def test_in_refined_space_boundaries():
    rho = np.array([8.999, 9.0, 10.0, 11.0, 11.001])
    np.testing.assert_array_equal(in_refined_space(rho, 10.0, 0.1), [False, True, True, True, False])
    np.testing.assert_array_equal(in_refined_space([10.0, 10.001], 10.0, 0.0), [True, False])
    assert in_refined_space(rho, 10.0, 0.1).dtype == bool


# ------------------------------------------------------------------------------------------- compare_edfs

def _base_errors(n=200, seed=11):
    return np.random.default_rng(seed).uniform(0.2, 0.5, n)


def test_compare_edfs_shifted_population_dominates():
    initial = _base_errors()
    refined = initial - 0.05          # same shape, 5 points of error better
    result = compare_edfs(refined, initial)
    assert result["dominates"] is True
    assert result["max_shortfall"] == 0.0
    assert result["area"] == pytest.approx(0.05, abs=1e-9)
    assert result["mean_error_refined"] < result["mean_error_initial"]
    assert result["median_error_refined"] < result["median_error_initial"]
    assert 0 < result["ks"] <= 1
    assert (result["n_refined"], result["n_initial"]) == (200, 200)
    json.dumps(result)   # plain numbers only


def test_compare_edfs_worse_population_does_not_dominate():
    initial = _base_errors()
    result = compare_edfs(initial + 0.05, initial)
    assert result["dominates"] is False
    assert result["max_shortfall"] > 0
    assert result["area"] == pytest.approx(-0.05, abs=1e-9)
    # A tolerance as large as the shortfall accepts it.
    assert compare_edfs(initial + 0.05, initial, tolerance=result["max_shortfall"])["dominates"] is True


def test_compare_edfs_identical_populations():
    errors = _base_errors()
    result = compare_edfs(errors, errors.copy())
    assert result["dominates"] is True
    assert result["area"] == 0.0
    assert result["ks"] == 0.0
    assert result["max_shortfall"] == 0.0


def test_compare_edfs_area_is_exact_mean_difference():
    """The integral of F_ref - F_init equals E_init[e] - E_ref[e] for step EDFs, weighted or not, and
    for populations of different sizes and shapes."""
    rng = np.random.default_rng(5)
    refined, initial = rng.beta(2, 5, 37), rng.uniform(0.1, 0.7, 81)
    w_ref, w_init = rng.uniform(0.1, 1, 37), rng.uniform(0.1, 1, 81)
    plain = compare_edfs(refined, initial)
    assert plain["area"] == pytest.approx(initial.mean() - refined.mean(), abs=1e-12)
    weighted = compare_edfs(refined, initial, w_ref, w_init)
    assert weighted["mean_error_refined"] == pytest.approx(np.average(refined, weights=w_ref))
    assert weighted["area"] == pytest.approx(weighted["mean_error_initial"] - weighted["mean_error_refined"],
                                             abs=1e-12)


def test_compare_edfs_hand_computed_ks_and_shortfall():
    # refined {0.1, 0.4}, initial {0.2, 0.3}: on (0.1, 0.2] F_ref = 0.5 > 0; on (0.3, 0.4] F_ref = 0.5 < 1.
    result = compare_edfs([0.1, 0.4], [0.2, 0.3])
    assert result["dominates"] is False
    assert result["max_shortfall"] == pytest.approx(0.5)
    assert result["ks"] == pytest.approx(0.5)
    assert result["area"] == pytest.approx(0.0, abs=1e-12)


def test_compare_edfs_names_mismatched_weights():
    with pytest.raises(ValueError, match="initial_weights"):
        compare_edfs([0.1, 0.2], [0.3, 0.4], initial_weights=[1.0])


# ------------------------------------------------------------------------------------------ bootstrap_min

def test_bootstrap_min_interval_and_determinism():
    rng = np.random.default_rng(2)
    errors = np.concatenate([[0.15, 0.15, 0.15], rng.uniform(0.2, 0.5, 60)])   # planted best: 0.15
    a = bootstrap_min(errors, n_boot=500, seed=4)
    lo, hi = a["ci95"]
    assert lo <= 0.15 <= hi
    assert lo >= errors.min()            # a resample's minimum never beats the sample's
    assert lo <= a["min_mean"] <= hi
    assert a["observed_min"] == 0.15
    assert bootstrap_min(errors, n_boot=500, seed=4) == a
    single = bootstrap_min([0.3], n_boot=10)
    assert single["ci95"] == [0.3, 0.3] and single["min_mean"] == pytest.approx(0.3)


def test_bootstrap_min_spread_depends_on_seed_not_on_calls():
    errors = np.random.default_rng(9).uniform(0.2, 0.5, 8)   # few samples: the minimum is often missed
    results = {bootstrap_min(errors, n_boot=200, seed=s)["min_mean"] for s in range(3)}
    assert len(results) > 1
    assert bootstrap_min(errors, n_boot=200, seed=1) == bootstrap_min(errors, n_boot=200, seed=1)


# ------------------------------------------------------------------------------------------------- plots

def _assert_png(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5_000


def test_plot_edfs_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    from fxprune.search.space_plots import plot_edfs
    rng = np.random.default_rng(0)
    populations = {
        "initial": {"errors": rng.uniform(0.3, 0.6, 80), "flops": rng.uniform(1.8e9, 2.2e9, 80)},
        "refined": {"errors": rng.uniform(0.25, 0.5, 40).tolist(), "flops": rng.uniform(1.8e9, 2.2e9, 40).tolist()},
        "empty": {"errors": [], "flops": []},
    }
    out = plot_edfs(populations, str(tmp_path / "edf.png"), title="regime 2 GFLOPs")
    assert out == str(tmp_path / "edf.png")
    _assert_png(out)


def test_plot_error_vs_params_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    from fxprune.search.space_plots import plot_error_vs_params
    rng = np.random.default_rng(0)
    samples = [{"params": float(p), "flops": float(f), "error": float(e), "round": r}
               for p, f, e, r in zip(rng.uniform(5e6, 20e6, 60), rng.uniform(1.8e9, 2.2e9, 60),
                                     rng.uniform(0.25, 0.6, 60), ["initial"] * 40 + ["refined"] * 15 + [2] * 5)]
    out = plot_error_vs_params(samples, str(tmp_path / "scatter.png"), rho_star=180.0, delta=0.1,
                               title="ResNet-50 @ 2G")
    _assert_png(out)
    _assert_png(plot_error_vs_params(samples, str(tmp_path / "plain.png")))


def test_plot_edfs_rejects_population_without_flops(tmp_path):
    pytest.importorskip("matplotlib")
    from fxprune.search.space_plots import plot_edfs
    with pytest.raises(ValueError, match="'flops'"):
        plot_edfs({"a": {"errors": [0.1]}}, str(tmp_path / "x.png"))
