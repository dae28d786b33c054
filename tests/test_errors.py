"""Bad input gets a clear error that names the problem, and the user's model is unchanged."""
import math

import pytest
import torch
from torch import nn

import fxprune
from fixtures import ConvChain, example_input


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(before, model):
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("budget", [0, -0.1, 1.5, math.nan, math.inf, "0.5", True, None, [0.5]])
def test_bad_budget(budget):
    model = ConvChain()
    before = snapshot(model)
    with pytest.raises(fxprune.BudgetError, match=r"\(0, 1\]|number"):
        fxprune.compile(model, budget, example_inputs=(example_input(),))
    assert unchanged(before, model)


@pytest.mark.parametrize("kwargs", [dict(flops=0), dict(params=2.0), dict()])
def test_bad_budget_object(kwargs):
    with pytest.raises(fxprune.BudgetError):
        fxprune.Budget(**kwargs)


def test_wrong_input_shape_names_the_node():
    model = ConvChain()
    before = snapshot(model)
    with pytest.raises(fxprune.ExampleInputsError, match=r"(?s)body_0_0.*shape and dtype"):
        fxprune.compile(model, 0.5, example_inputs=(torch.randn(1, 4, 8, 8),))
    assert unchanged(before, model)


def test_wrong_input_dtype():
    with pytest.raises(fxprune.ExampleInputsError, match="dtype"):
        fxprune.compile(ConvChain(), 0.5, example_inputs=(torch.zeros(1, 3, 8, 8, dtype=torch.long),))


def test_wrong_number_of_inputs_and_missing_inputs():
    with pytest.raises(fxprune.ExampleInputsError, match="takes 1 input"):
        fxprune.compile(ConvChain(), 0.5, example_inputs=(example_input(), example_input()))
    with pytest.raises(fxprune.ExampleInputsError, match="required"):
        fxprune.compile(ConvChain(), 0.5, example_inputs=None)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
            x = x * 2
        return self.conv(x)


def test_untraceable_model_points_at_the_users_line():
    model = DataDependent()
    before = snapshot(model)
    with pytest.raises(fxprune.UnsupportedModelError) as info:
        fxprune.compile(model, 0.5, example_inputs=(example_input(),))
    message = str(info.value)
    assert "test_errors.py" in message and "if x.sum() > 0" in message
    assert "leaf_modules" in message and "torch.where" in message
    assert unchanged(before, model)


def test_no_prunable_channels():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    with pytest.raises(fxprune.NoPrunableChannelsError, match="graph output"):
        fxprune.compile(model, 0.5, example_inputs=(example_input(),))


def test_unreachable_budget_says_how_far_it_got():
    model = ConvChain()
    before = snapshot(model)
    with pytest.raises(fxprune.BudgetError, match=r"keeps FLOPs \d+\.\d%.*asks for FLOPs 1\.0%"):
        fxprune.compile(model, 0.01, example_inputs=(example_input(),), min_channels=4)
    assert unchanged(before, model)


def test_ignore_unknown_module_suggests_names():
    model = ConvChain()
    with pytest.raises(fxprune.ConfigError, match=r"no module named 'body.1.conv'.*did you mean"):
        fxprune.compile(model, 0.5, example_inputs=(example_input(),), ignore=["body.1.conv"])
    with pytest.raises(fxprune.ConfigError, match="not part of the model"):
        fxprune.compile(model, 0.5, example_inputs=(example_input(),), ignore=[nn.Conv2d(1, 1, 1)])


@pytest.mark.parametrize("kwargs", [dict(round_to=0), dict(min_channels=-1), dict(round_to=2.5),
                                    dict(importance="nope"), dict(allocation="nope")])
def test_bad_options(kwargs):
    with pytest.raises(fxprune.ConfigError):
        fxprune.compile(ConvChain(), 0.5, example_inputs=(example_input(),), **kwargs)


def test_not_a_module():
    with pytest.raises(fxprune.UnsupportedModelError, match="nn.Module"):
        fxprune.compile(lambda x: x, 0.5, example_inputs=(example_input(),))


def test_training_mode_model_is_pruned_in_eval_mode_and_left_training():
    model = ConvChain().train()
    before = snapshot(model)
    with pytest.warns(UserWarning, match="training mode"):
        pruned = fxprune.compile(model, 0.5, example_inputs=(example_input(),))
    assert model.training and all(m.training for m in model.modules())
    assert not pruned.training and not any(m.training for m in pruned.modules())
    assert unchanged(before, model)  # BN running stats untouched (no forward in train mode)


class _FrozenNormOnEval(nn.Module):
    """A layer whose train() does more than set flags (as detection backbones freeze their norms)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

    def train(self, mode: bool = True):
        if not mode:
            self.bn.eps = 1e-3
        return super().train(mode)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_a_layer_overriding_train_is_put_in_eval_mode_through_its_override():
    model = nn.Sequential(_FrozenNormOnEval(), nn.ReLU(), nn.Conv2d(8, 4, 3)).train()
    with pytest.warns(UserWarning, match="training mode"):
        pruned = fxprune.compile(model, 0.6, example_inputs=(example_input(),))
    assert model.training and model[0].bn.eps == 1e-5  # the user's layer was never switched
    assert getattr(pruned, "0").bn.eps == 1e-3  # its copy went to eval mode through the override
    assert not any(m.training for m in pruned.modules())


# ------------------------------------------------------------------ data and files at the boundaries
def _classifier():
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 10)).eval()


@pytest.mark.parametrize("batch, match", [
    ((torch.randn(2, 4, 16, 16), torch.zeros(2, dtype=torch.long)), r"(?s)batch 0 does not fit.*\(2, 4, 16, 16\).*3 channels"),
    ((torch.randn(2, 3, 16, 16), torch.full((2,), 12)), r"(?s)batch 0 does not fit.*in \[12, 12\].*class indices"),
])
def test_calibration_batches_that_do_not_fit_are_a_data_error(batch, match):
    model = _classifier()
    before = snapshot(model)
    with pytest.raises(fxprune.DataError, match=match):
        fxprune.compile(model, 0.5, example_inputs=(torch.randn(2, 3, 16, 16),), importance="taylor", round_to=1,
                        data=[batch])
    assert unchanged(before, model)


def test_load_of_a_missing_or_corrupt_file_is_a_load_error(tmp_path):
    with pytest.raises(fxprune.LoadError, match="no file at"):
        fxprune.load(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(fxprune.LoadError, match="corrupt or was not written by fxprune.save"):
        fxprune.load(corrupt)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(fxprune.LoadError, match="not a file written by fxprune.save"):
        fxprune.load(other)
    pruned = fxprune.compile(ConvChain(), 0.5, example_inputs=(example_input(),), round_to=1)
    good = tmp_path / "good.pt"
    fxprune.save(pruned, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(fxprune.LoadError):
        fxprune.load(truncated)
