"""Network pruning space search: the sampler, the refined space, the search end to end, and the same
result from one process, a process pool and a 2-process torchrun job."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fxprune
from fxprune.training.cifar_resnet import cifar_resnet
from fxprune.compiler import _analyse
from fxprune.cost import build_cost_model
from fxprune.errors import BudgetError, ConfigError
from fxprune.passes.pruning_space import PruningSpace, Regime

sys.path.insert(0, os.path.dirname(__file__))
import space_search_job as job  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def resnet20_space(**options):
    model = cifar_resnet(20).eval()
    gm, groups = _analyse(model, (torch.randn(1, 3, 32, 32),), set(), ())
    cost = build_cost_model(gm, groups)
    scores = np.random.default_rng(0).random(groups.n_units)
    return PruningSpace(groups, cost, scores, **options)


@pytest.fixture(scope="module")
def space():
    return resnet20_space()


def test_sampler_lands_in_a_narrow_band_and_spreads_over_it(space):
    regime = Regime(0.48, 0.50)
    samples = space.sample_many(40, np.random.default_rng(0), regime)
    ratios = np.array([space.cost_of(w)[0] / space.flops0 for w in samples])
    assert ((ratios >= 0.48) & (ratios <= 0.50)).all()
    assert len({tuple(w) for w in samples}) == 40
    widths = np.array(samples)
    # every group varies across samples: not one repaired point with noise
    assert (widths.std(axis=0) > 0).all()
    # rejection sampling would accept only a few per cent of uniform draws in this band
    rng = np.random.default_rng(1)
    uniform = [[levels[rng.integers(len(levels))] for levels in space.levels] for _ in range(300)]
    accepted = np.mean([0.48 <= space.cost_of(w)[0] / space.flops0 <= 0.50 for w in uniform])
    assert accepted < 0.15


def test_sampler_is_seeded(space):
    regime = Regime(0.45, 0.50)
    a = space.sample_many(5, np.random.default_rng(7), regime)
    b = space.sample_many(5, np.random.default_rng(7), regime)
    assert all((x == y).all() for x, y in zip(a, b))


def test_refined_regime_holds_the_ratio_and_narrows_the_space(space):
    regime = Regime(0.46, 0.50)
    initial = space.sample_many(40, np.random.default_rng(0), regime)
    rho = np.array([np.divide(*space.cost_of(w)) for w in initial])
    rho_star = float(np.median(rho))
    refined = space.sample_many(40, np.random.default_rng(1), regime.refined(rho_star, 0.05))
    rho_refined = np.array([np.divide(*space.cost_of(w)) for w in refined])
    assert (np.abs(rho_refined - rho_star) <= 0.05 * rho_star + 1e-9).all()
    assert np.ptp(rho_refined) < np.ptp(rho)
    flops = np.array([space.cost_of(w)[0] / space.flops0 for w in refined])
    assert ((flops >= 0.46) & (flops <= 0.50)).all()


def test_keep_vector_keeps_the_most_important_channels(space):
    widths = [levels[0] for levels in space.levels]
    keep = space.keep_vector(widths)
    for gid, order, width in zip(space.dims, space.orders, widths):
        group = space.groups.groups[gid]
        assert keep[group.units].sum() == width
        removed = order[: group.size - width]
        assert not keep[removed].any()


def test_unreachable_regime_is_a_clear_error(space):
    with pytest.raises(BudgetError, match="no subnetwork found"):
        space.sample(np.random.default_rng(0), Regime(0.001, 0.002), max_restarts=2)
    with pytest.raises(ConfigError, match="keep_ratios"):
        resnet20_space(keep_ratios=(0.0, 1.0))


def test_search_end_to_end_on_a_tiny_model(tmp_path):
    pruned, result = job.run(out_dir=str(tmp_path))
    report = pruned.meta["fxprune"]
    assert report["verification"]["max_abs_error"] < 1e-10
    assert 0.45 - 1e-9 <= report["flops"]["ratio"] <= 0.5 + 1e-9
    assert report["options"]["allocation"] == "search"
    # the plan is the best sample's widths
    errors = [s["error"] for s in result["samples"]]
    assert result["best"]["error"] == min(errors)
    assert report["flops"]["ratio"] == pytest.approx(result["best"]["flops_ratio"])
    assert report["search"]["rho_star"] == result["rho_star"]
    assert [s["round"] for s in result["samples"]].count("refined") == 6
    for s in result["samples"]:
        if s["round"] == "refined":
            assert abs(s["rho"] - result["rho_star"]) <= 0.1 * result["rho_star"] + 1e-9
    saved = json.loads((tmp_path / "search.json").read_text())
    assert len(saved["samples"]) == 14 and saved["rho_star"] == result["rho_star"]
    for png in ("edf.png", "error_vs_params.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    # same seed, same search
    _, again = job.run()
    assert [s["error"] for s in again["samples"]] == errors


def test_search_needs_a_flops_budget_and_an_evaluator():
    with pytest.raises(ConfigError, match="evaluator"):
        fxprune.SpaceSearch()
    with pytest.raises(ConfigError, match="FLOPs"):
        fxprune.compile(job.make_model(), fxprune.Budget(params=0.5), example_inputs=torch.randn(1, 3, 8, 8),
                        allocation=job.make_search())


def test_worker_processes_give_the_same_errors():
    _, one = job.run()
    _, pool = job.run(workers=2)
    assert [s["error"] for s in pool["samples"]] == [s["error"] for s in one["samples"]]
    assert pool["best"]["widths"] == one["best"]["widths"]


def test_torchrun_two_processes_give_the_same_result(tmp_path):
    out = tmp_path / "dist.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "space_search_job.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    distributed = json.loads(out.read_text())
    assert distributed["world_size"] == 2
    _, local = job.run()
    assert [s["error"] for s in distributed["result"]["samples"]] == [s["error"] for s in local["samples"]]
    assert distributed["result"]["best"]["widths"] == local["best"]["widths"]
    assert distributed["result"]["rho_star"] == local["rho_star"]


def test_cli_search_on_the_cifar_resnet(tmp_path):
    from fxprune.apps.cli import main
    from fxprune.training.data import find_cifar10
    checkpoint = os.path.join(HERE, "..", "..", "shared", "models", "cifar_resnet20.pt")
    try:
        find_cifar10()
    except FileNotFoundError:
        pytest.skip("CIFAR-10 not found")
    if not os.path.exists(checkpoint):
        pytest.skip("no CIFAR ResNet-20 checkpoint in ../shared/models")
    code = main(["-q", "search", checkpoint, "--samples", "4", "--refined", "2", "--buckets", "2", "--proxy-steps",
                 "1", "--recalibrate-batches", "1", "--val", "500", "--out", str(tmp_path)])
    assert code == 0
    saved = json.loads((tmp_path / "search.json").read_text())
    assert len(saved["samples"]) == 6
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["flops"]["ratio"] == pytest.approx(saved["best"]["flops_ratio"])
    assert 0.48 - 1e-9 <= report["flops"]["ratio"] <= 0.5 + 1e-9
    restored = fxprune.load(str(tmp_path / "pruned.pt"))
    x = torch.randn(2, 3, 32, 32)
    assert restored(x).shape == (2, 10)
