"""AOFP's binary filter search (passes/aofp_search.py) against a synthetic damage oracle.

The oracle stands in for the training loop's t-value (ALGORITHMS.md 1.2): every channel j has a known
importance w_j and masking R costs T(R) = sum_{j in R} w_j / sum_{j alive} w_j, so the channels with
w_j = 0 are exactly the ones that can be removed for free, and an important channel makes every R
that contains it cost at least its share."""
import pickle

import numpy as np
import pytest

from fxprune.passes.aofp_search import (
    UNSAMPLED_TAU,
    AOFPSearch,
    AOFPSearchConfig,
    AOFPSearchError,
    GroupSearch,
    tf_first_half_size,
)


def oracle(weights, noise=0.0, seed=0):
    """T(R) for a group with per-channel importance `weights` (optionally with multiplicative noise,
    like minibatch-to-minibatch variation of the measured damage)."""
    w = np.asarray(weights, dtype=float)
    rng = np.random.default_rng(seed)

    def damage(sampled, alive):
        total = w[alive].sum()
        t = 0.0 if total == 0 else w[sampled].sum() / total
        return t * (1.0 + noise * rng.standard_normal()) if noise else t

    return damage


def run(search, oracles, stop, start=0, on_sample=None):
    """The training loop's part: sample, measure, record, end the step."""
    for it in range(start, stop):
        samples = search.sample(it)
        if on_sample is not None:
            on_sample(it, samples)
        masks = search.masks
        damages = [None if r is None else o(r, m) for r, o, m in zip(samples, oracles, masks)]
        search.record(samples, damages)
        search.step_end(it)
    return search


def cfg(**kw):
    base = dict(theta=0.01, iters_per_half=30, warmup_iters=0)
    base.update(kw)
    return AOFPSearchConfig(**base)


def canonical(history):
    """History in a comparable form (numpy arrays to lists)."""
    return [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in e.items()} for e in history]


def check_binary_search_sizes(group_history, n, frozen=None):
    """The sizes follow |S|/2, |S|/4, ...: after a narrow the next half searches the m survivors;
    after a move or a restart it searches all alive (unfrozen) channels again."""
    frozen = np.zeros(n, dtype=bool) if frozen is None else frozen
    alive = np.ones(n, dtype=bool)
    expected_space = int((alive & ~frozen).sum())
    for e in group_history:
        assert e["space_size"] == expected_space
        assert e["size"] == e["space_size"] // 2
        assert len(e["candidates"]) == e["size"]
        alive[e["pruned"]] = False
        expected_space = e["size"] if e["kind"] == "narrow" else int((alive & ~frozen).sum())


# ------------------------------------------------------------------------------------------------
# finding the unimportant channels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unimportant_channels_are_pruned_and_important_ones_kept(seed):
    n = 16
    dead = [1, 5, 9, 13]
    w = np.ones(n)
    w[dead] = 0.0
    search = run(AOFPSearch([n], cfg(), seed=seed), [oracle(w, noise=0.3, seed=seed)], 1500)
    assert np.flatnonzero(~search.masks[0]).tolist() == dead
    history = search.groups[0].history
    moves = [e for e in history if e["kind"] == "move"]
    assert moves and all(e["tau_max"] < 0.01 for e in moves)
    check_binary_search_sizes(history, n)


def test_several_groups_each_find_their_own_unimportant_channels():
    sizes = [16, 12, 8]
    dead = [[0, 2, 15], [7], [3, 4]]
    weights = []
    for n, d in zip(sizes, dead):
        w = np.random.default_rng(n).uniform(0.5, 2.0, n)
        w[d] = 0.0
        weights.append(w)
    search = run(AOFPSearch(sizes, cfg(warmup_iters=5), seed=0), [oracle(w) for w in weights], 2000)
    for mask, d in zip(search.masks, dead):
        assert np.flatnonzero(~mask).tolist() == d
    assert search.widths == [n - len(d) for n, d in zip(sizes, dead)]


def test_search_sizes_halve_until_a_move():
    # One free channel among 16: the first halves fail theta (every R of 8 holds important channels),
    # so the search narrows 16 -> 8 -> 4 -> 2 and moves with m = 1; then, with nothing free left,
    # 15 -> 7 -> 3 -> 1 and a restart.
    n = 16
    w = np.ones(n)
    w[6] = 0.0
    search = run(AOFPSearch([n], cfg(iters_per_half=200), seed=0), [oracle(w)], 7 * 200)
    h = search.groups[0].history
    assert [e["kind"] for e in h] == ["narrow", "narrow", "narrow", "move", "narrow", "narrow", "restart"]
    assert [e["size"] for e in h] == [8, 4, 2, 1, 7, 3, 1]
    assert [e["space_size"] for e in h] == [16, 8, 4, 2, 15, 7, 3]
    assert h[3]["pruned"].tolist() == [6]
    assert 6 in h[0]["candidates"] and 6 in h[1]["candidates"] and 6 in h[2]["candidates"]
    assert [e["iter"] for e in h] == [200 * (k + 1) - 1 for k in range(7)]
    check_binary_search_sizes(h, n)


# ------------------------------------------------------------------------------------------------
# theta


def test_no_move_when_every_half_fails_theta():
    n = 8
    search = run(AOFPSearch([n], cfg(iters_per_half=20), seed=0), [oracle(np.ones(n))], 40 * 20)
    h = search.groups[0].history
    assert len(h) == 40
    assert {e["kind"] for e in h} == {"narrow", "restart"}
    assert all(e["tau_max"] >= 0.01 for e in h)
    assert search.masks[0].all()


def test_pruning_stops_once_only_important_channels_remain():
    n = 16
    w = np.ones(n)
    w[[3, 4, 10]] = 0.0
    search = run(AOFPSearch([n], cfg(), seed=0), [oracle(w)], 3000)
    h = search.groups[0].history
    last_move = max(i for i, e in enumerate(h) if e["kind"] == "move")
    assert len(h) - last_move > 20  # many halves after the last move, none of them a move
    assert np.flatnonzero(~search.masks[0]).tolist() == [3, 4, 10]


def test_small_but_nonzero_importance_is_pruned_below_theta_only():
    # Channels worth 1e-4 of the total each are prunable at theta = 0.01; at theta = 1e-5 they are not.
    n = 8
    w = np.ones(n)
    w[[2, 5]] = 1e-4
    loose = run(AOFPSearch([n], cfg(theta=0.01), seed=0), [oracle(w)], 1200)
    assert np.flatnonzero(~loose.masks[0]).tolist() == [2, 5]
    strict = run(AOFPSearch([n], cfg(theta=1e-5), seed=0), [oracle(w)], 1200)
    assert strict.masks[0].all()


def test_theta_scale_sets_each_groups_own_threshold():
    # Two identical groups whose cheap channels cost 1e-3 each: at theta 1e-4 only the group whose
    # threshold is scaled by 20 (2e-3) may prune them.
    n = 8
    w = np.ones(n)
    w[[1, 6]] = 1e-3 * (n - 2) / (1 - 2e-3)  # each about 1e-3 of the group's total
    search = run(AOFPSearch([n, n], cfg(theta=1e-4), seed=0, theta_scale=[1.0, 20.0]), [oracle(w), oracle(w)], 1200)
    assert search.masks[0].all()
    assert np.flatnonzero(~search.masks[1]).tolist() == [1, 6]
    with pytest.raises(AOFPSearchError, match="theta scales"):
        AOFPSearch([n, n], cfg(), theta_scale=[1.0])
    with pytest.raises(AOFPSearchError, match="theta_scale"):
        AOFPSearch([n], cfg(), theta_scale=[0.0])


@pytest.mark.parametrize("variant,moves", [("pytorch", False), ("tf", True)])
def test_threshold_is_strict_for_pytorch_and_non_strict_for_tf(variant, moves):
    # Every mask costs exactly theta: PyTorch needs tau_max < theta, TF accepts tau_max <= theta.
    # (0.25 and its sums are exact in binary, so the mean damage is exactly theta.)
    n = 8
    theta = 0.25
    search = AOFPSearch([n], cfg(theta=theta, iters_per_half=50, variant=variant), seed=0)
    run(search, [lambda r, alive: theta], 50)
    (event,) = search.groups[0].history
    assert event["tau_max"] == theta
    assert event["kind"] == ("move" if moves else "narrow")
    assert (~search.masks[0]).sum() == (4 if moves else 0)


# ------------------------------------------------------------------------------------------------
# the TF variant's sizes


def test_tf_first_half_size_matches_the_official_rule():
    assert [tf_first_half_size(s) for s in [2, 3, 4, 5, 6, 8, 10, 11, 12, 16, 24]] == \
        [1, 2, 2, 2, 4, 4, 4, 8, 8, 8, 16]


def test_tf_variant_sizes_only_the_first_half_after_a_restart_by_power_of_two():
    n = 12
    never = oracle(np.ones(n))
    tf = run(AOFPSearch([n], cfg(iters_per_half=20, variant="tf"), seed=0), [never], 5 * 20)
    h = tf.groups[0].history
    assert [e["size"] for e in h] == [8, 4, 2, 1, 8]  # 12 -> 8 (power of two), then halving
    assert [e["space_size"] for e in h] == [12, 8, 4, 2, 12]
    assert [e["kind"] for e in h] == ["narrow", "narrow", "narrow", "restart", "narrow"]
    pt = run(AOFPSearch([n], cfg(iters_per_half=20), seed=0), [never], 4 * 20)
    assert [e["size"] for e in pt.groups[0].history] == [6, 3, 1, 6]


def test_tf_variant_uses_the_power_of_two_size_again_after_a_move():
    n = 12
    w = np.zeros(n)  # everything free: every half is a move
    search = run(AOFPSearch([n], cfg(iters_per_half=20, variant="tf"), seed=0), [oracle(w)], 200)
    h = search.groups[0].history
    # 12 -> prune 8 (4 left) -> prune 2 (2 left) -> prune 1 (1 left, finished)
    assert [(e["kind"], e["space_size"], e["size"]) for e in h] == \
        [("move", 12, 8), ("move", 4, 2), ("move", 2, 1)]
    assert search.widths == [1]


# ------------------------------------------------------------------------------------------------
# never-sampled channels


def test_never_sampled_channels_get_tau_999_and_are_not_pruned():
    # single_dropout with H = 3: at most 3 of 8 channels are measured, but m = 4, so the 4th lowest
    # tau is an unmeasured channel's 999 and the half narrows instead of pruning free-looking channels.
    n = 8
    sampled = []
    search = AOFPSearch([n], cfg(iters_per_half=3, single_dropout=True), seed=0)
    run(search, [oracle(np.zeros(n))], 3, on_sample=lambda it, s: sampled.append(s[0]))
    assert all(len(r) == 1 for r in sampled)
    (event,) = search.groups[0].history
    assert event["kind"] == "narrow"
    assert event["tau_max"] == UNSAMPLED_TAU
    measured = set(np.concatenate(sampled).tolist())
    assert measured <= set(event["candidates"].tolist())  # measured (free) channels rank first
    assert search.masks[0].all()


def test_tau_is_the_mean_damage_and_999_where_unsampled():
    g = GroupSearch(6, 0, cfg(), np.random.default_rng(0))
    g.record(np.array([0, 1]), 0.2)
    g.record(np.array([1, 2]), 0.4)
    g.record(np.array([2]), None)          # unmeasured steps are ignored, not counted as harmless
    g.record(np.array([3]), float("nan"))
    np.testing.assert_allclose(g.tau(), [0.2, 0.3, 0.4, UNSAMPLED_TAU, UNSAMPLED_TAU, UNSAMPLED_TAU])


# ------------------------------------------------------------------------------------------------
# guards: min_channels, frozen units


@pytest.mark.parametrize("min_channels,left", [(1, 1), (3, 3), (0, 1)])
def test_min_channels_holds_when_every_channel_is_free(min_channels, left):
    n = 8
    search = AOFPSearch([n], cfg(min_channels=min_channels), seed=0)
    run(search, [oracle(np.zeros(n))], 600)
    assert search.widths == [left]
    assert search.finished
    assert search.sample(600) == [None]
    assert search.step_end(600 + 30 * 10) == []


def test_min_channels_prunes_only_the_best_part_of_k_that_fits():
    # 8 free channels, keep 3: the first move prunes 4, the next one (m = 2) may prune only 1.
    # single_dropout makes tau_j = w_j / sum(w) exactly, so the ranking is known: 0 < 1 < ... < 7.
    n = 8
    w = np.arange(1.0, n + 1)
    search = AOFPSearch([n], cfg(min_channels=3, theta=10.0, iters_per_half=200, single_dropout=True), seed=0)
    run(search, [oracle(w)], 600)
    moves = [e for e in search.groups[0].history if e["kind"] == "move"]
    assert [len(e["pruned"]) for e in moves] == [4, 1]
    assert moves[0]["pruned"].tolist() == [0, 1, 2, 3]
    assert moves[1]["size"] == 2
    assert moves[1]["pruned"].tolist() == [4]  # the lower-damage one of K = {4, 5}
    assert np.flatnonzero(search.masks[0]).tolist() == [5, 6, 7]


def test_frozen_units_are_never_sampled_nor_pruned():
    n = 8
    frozen = np.zeros(n, dtype=bool)
    frozen[[0, 3]] = True
    seen = []
    search = AOFPSearch([n], cfg(), seed=0, frozen=[frozen])
    run(search, [oracle(np.zeros(n))], 600, on_sample=lambda it, s: seen.append(s[0]))
    seen = [r for r in seen if r is not None]
    assert seen and not any(np.isin(r, [0, 3]).any() for r in seen)
    mask = search.masks[0]
    assert mask[[0, 3]].all()
    # the searchable channels go down to one (a search space of 1 cannot be halved), frozen ones stay
    assert mask.sum() == 3 and search.finished
    check_binary_search_sizes(search.groups[0].history, n, frozen)


def test_a_group_too_small_to_search_is_finished_from_the_start():
    one = np.zeros(3, dtype=bool)
    one[[0, 1]] = True  # only channel 2 searchable
    search = AOFPSearch([1, 4, 3], cfg(), seed=0, frozen=[None, None, one])
    samples = search.sample(100)  # after every group's start
    assert samples[0] is None and samples[2] is None and samples[1] is not None


# ------------------------------------------------------------------------------------------------
# schedule and determinism


def test_staggered_starts_and_no_sampling_before():
    sizes = [8, 8, 8, 8]
    search = AOFPSearch(sizes, cfg(warmup_iters=5, iters_per_half=10), seed=0)
    assert search.starts == [5, 7, 9, 11]  # W + idx * floor(H / L) = 5 + idx * 2
    first_event = {}

    def check(it, samples):
        for g, r in enumerate(samples):
            assert (r is None) == (it < search.starts[g])
            if r is not None and it < search.starts[g] + 10:
                assert len(r) == 4  # the first half searches all 8

    for it in range(40):
        samples = search.sample(it)
        check(it, samples)
        search.record(samples, [None if r is None else 1.0 for r in samples])
        for e in search.step_end(it):
            first_event.setdefault(e["group"], e["iter"])
    assert first_event == {g: s + 10 - 1 for g, s in enumerate(search.starts)}


def same_run(seed):
    sizes = [16, 12, 8]
    weights = [np.r_[np.zeros(3), np.ones(13)], np.r_[np.ones(11), 0.0], np.ones(8)]
    search = AOFPSearch(sizes, cfg(warmup_iters=3), seed=seed)
    first = []
    run(search, [oracle(w, noise=0.2, seed=1) for w in weights], 700,
        on_sample=lambda it, s: first.append(s) if it == 30 else None)
    return search, first[0]


def test_same_seed_same_result_different_seed_different_sampling():
    a, sa = same_run(0)
    b, sb = same_run(0)
    c, sc = same_run(1)
    assert all((x == y).all() for x, y in zip(a.masks, b.masks))
    assert canonical(a.history) == canonical(b.history)
    assert all(r is not None for r in sa)
    assert all(np.array_equal(x, y) for x, y in zip(sa, sb))
    assert any(not np.array_equal(x, y) for x, y in zip(sa, sc))
    # each group has its own stream: equal-sized groups do not draw in lockstep
    twins = AOFPSearch([16, 16], cfg(), seed=0)
    r0, r1 = twins.sample(15)  # both started, first draw of each
    assert r0 is not None and r1 is not None and not np.array_equal(r0, r1)


def test_state_dict_round_trip_resumes_identically():
    sizes = [16, 12, 8]
    weights = [np.r_[np.zeros(5), np.ones(11)], np.r_[np.ones(10), 0.0, 0.0], np.zeros(8)]
    config = cfg(warmup_iters=4, iters_per_half=25)
    a = AOFPSearch(sizes, config, seed=7)
    run(a, [oracle(w) for w in weights], 260)  # 260 is mid-half for every group
    state = pickle.loads(pickle.dumps(a.state_dict()))
    snapshot = canonical([dict(e) for e in a.history])
    run(a, [oracle(w) for w in weights], 900, start=260)

    b = AOFPSearch(sizes, config, seed=12345)  # a different seed: everything must come from the state
    b.load_state_dict(state)
    assert canonical(b.history) == snapshot
    run(b, [oracle(w) for w in weights], 900, start=260)
    assert all((x == y).all() for x, y in zip(a.masks, b.masks))
    assert canonical(a.history) == canonical(b.history)
    assert all(np.array_equal(x, y) for x, y in zip(a.sample(900), b.sample(900)))

    with pytest.raises(AOFPSearchError):
        AOFPSearch([16, 12], config).load_state_dict(state)


def test_state_dict_is_a_snapshot():
    a = AOFPSearch([8], cfg(), seed=0)
    state = a.state_dict()
    run(a, [oracle(np.zeros(8))], 200)
    assert state["groups"][0]["alive"].all() and state["groups"][0]["history"] == []


# ------------------------------------------------------------------------------------------------
# API details


def test_score_masks_zero_the_sampled_channels_of_the_base_mask():
    search = AOFPSearch([8, 6], cfg(warmup_iters=0, iters_per_half=10), seed=0)
    samples = search.sample(5)  # both groups started (the second at 0 + 1 * floor(10 / 2))
    assert all(r is not None for r in samples)
    for s, r, b in zip(search.score_masks(samples), samples, search.masks):
        assert not s[r].any() and s.sum() == b.sum() - len(r)
    assert [m.all() for m in search.score_masks([None, None])] == [True, True]


def test_invalid_config_and_inputs_raise():
    with pytest.raises(AOFPSearchError):
        AOFPSearch([8], AOFPSearchConfig(variant="keras"))
    with pytest.raises(ValueError):
        AOFPSearch([8], AOFPSearchConfig(iters_per_half=0))
    with pytest.raises(AOFPSearchError):
        AOFPSearch([8], cfg(), frozen=[np.zeros(7, dtype=bool)])
    search = AOFPSearch([8, 8], cfg())
    with pytest.raises(AOFPSearchError):
        search.record([None], [0.0, 0.0])
