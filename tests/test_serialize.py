"""Save and load: the file fxprune.save writes comes back identical, with and without the original
class, in a fresh process; a plan re-applied to the original architecture gives the same model."""
import subprocess
import sys
import textwrap

import pytest
import torch

import fxprune
from fxprune.errors import ConfigError

torchvision = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def pruned_resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    pruned = fxprune.compile(model, 0.5, example_inputs=(x,), verify=False)
    with torch.no_grad():  # as after fine-tuning: the weights are no longer slices of the original's
        for p in pruned.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        pruned.bn1.running_mean.add_(0.1)
    return model, pruned, x


def test_round_trip_in_a_fresh_process_without_torchvision(pruned_resnet, tmp_path):
    _, pruned, _ = pruned_resnet
    path, x2 = tmp_path / "pruned.pt", torch.randn(2, 3, 64, 64)
    fxprune.save(pruned, path)
    torch.save({"x": x2, "y": pruned(x2).detach()}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys, torch, fxprune
        m = fxprune.load({str(path)!r})
        data = torch.load({str(tmp_path / "io.pt")!r})
        assert "torchvision" not in sys.modules, "loading needed the original package"
        assert torch.equal(m(data["x"]), data["y"]), "outputs differ"
        assert m.meta["fxprune"]["flops"]["ratio"] <= 0.5
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_plan_plus_weights_reapplied_to_the_original_architecture(pruned_resnet, tmp_path):
    _, pruned, x = pruned_resnet
    path, x2 = tmp_path / "pruned.pt", torch.randn(2, 3, 64, 64)
    fxprune.save(pruned, path)
    fresh = torchvision.models.resnet18().eval()  # other random weights: all weights come from the file
    loaded = fxprune.load(path, model=fresh, example_inputs=(x,))
    assert torch.equal(loaded(x2), pruned(x2))
    assert loaded.meta["fxprune"]["modules"] == pruned.meta["fxprune"]["modules"]


def test_apply_plan_reproduces_compile(pruned_resnet):
    model, _, x = pruned_resnet
    original = fxprune.compile(model, 0.6, example_inputs=(x,), verify=False)
    again = fxprune.apply_plan(model, original.meta["fxprune"], example_inputs=(x,))
    x2 = torch.randn(2, 3, 64, 64)
    assert torch.equal(again(x2), original(x2))
    assert again.meta["fxprune"]["verification"]["max_abs_error"] < 1e-9


def test_plan_of_another_architecture_is_refused(pruned_resnet):
    _, pruned, x = pruned_resnet
    with pytest.raises(ConfigError, match="does not fit"):
        fxprune.apply_plan(torchvision.models.resnet34().eval(), pruned.meta["fxprune"], example_inputs=(x,))
    with pytest.raises(ConfigError, match="fxprune report"):
        fxprune.apply_plan(torchvision.models.resnet18().eval(), {"flops": 1}, example_inputs=(x,))


def test_load_rejects_other_files(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(fxprune.LoadError, match="not a file written by fxprune.save"):
        fxprune.load(tmp_path / "other.pt")
