"""The command line as a script would use it: outputs, files and exit codes."""
import json
import textwrap

import pytest
import torch

from fxprune.cli import EXIT_INPUT, EXIT_OK, main

pytest.importorskip("torchvision")


def test_prune_torchvision_model_writes_model_and_report(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["-q", "prune", "resnet18", "--budget", "0.5", "--input-shape", "1,3,64,64", "--out", str(out)])
    assert rc == EXIT_OK
    printed = capsys.readouterr().out
    assert "FLOPs" in printed and "verification: PASSED" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["flops"]["ratio"] <= 0.5
    pruned = torch.load(out / "pruned.pt", weights_only=False)
    assert pruned(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


def test_prune_model_from_a_python_file(tmp_path, capsys):
    source = tmp_path / "my_model.py"
    source.write_text(textwrap.dedent("""
        import torch
        def build():
            return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 3),
                                       torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 10))
    """))
    rc = main(["-q", "prune", f"{source}:build", "--budget", "0.6", "--input-shape", "1,3,8,8"])
    assert rc == EXIT_OK
    assert "verification: PASSED" in capsys.readouterr().out


def test_exit_codes_for_bad_input(capsys):
    assert main(["-q", "prune", "resnet18", "--budget", "1.5", "--input-shape", "1,3,64,64"]) == EXIT_INPUT
    assert "(0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["-q", "prune", "resnet5000"])
    assert info.value.code == 2
    assert "did you mean" in capsys.readouterr().err


def test_analyze_prints_the_groups(capsys):
    assert main(["-q", "analyze", "resnet18", "--input-shape", "1,3,64,64"]) == EXIT_OK
    assert "prunable" in capsys.readouterr().out
