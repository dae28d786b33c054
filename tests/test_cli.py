"""The command line as a script would use it: outputs, files and exit codes."""
import json
import textwrap

import pytest
import torch

import fxprune
from fxprune.apps.cli import EXIT_INPUT, EXIT_OK, main

pytest.importorskip("torchvision")


def test_prune_writes_model_onnx_report_views_and_latency(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["-q", "prune", "resnet18", "--budget", "0.5", "--input-shape", "1,3,64,64", "--out", str(out),
               "--runs", "2", "--warmup", "1"])
    assert rc == EXIT_OK
    printed = capsys.readouterr().out
    assert "FLOPs" in printed and "verification: PASSED" in printed
    assert "b1 speed-up" in printed and "onnxruntime matches torch" in printed
    for name in ("pruned.pt", "report.json", "pruned.onnx", "dense.onnx", "bench.json", "resnet18.html"):
        assert (out / name).exists(), name
    report = json.loads((out / "report.json").read_text())
    assert report["flops"]["ratio"] <= 0.5
    assert report["options"]["round_to"] == "auto"
    pruned = fxprune.load(out / "pruned.pt")
    assert pruned(torch.randn(2, 3, 64, 64)).shape == (2, 1000)
    bench = json.loads((out / "bench.json").read_text())
    assert [r["name"] for r in bench["rows"]] == ["dense", "pruned"]
    assert bench["rows"][1]["flops"] == report["flops"]["after"]


def test_bench_writes_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rc = main(["-q", "bench", "resnet18", "--budgets", "0.75,0.5", "--input-shape", "1,3,32,32", "--batch-sizes",
               "1,2", "--runs", "2", "--warmup", "1", "--threads", "1", "--json", str(tmp_path / "b.json"),
               "--plot", str(tmp_path / "b.png")])
    assert rc == EXIT_OK
    assert "fxprune@0.75" in capsys.readouterr().out
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["dense", "fxprune@0.75", "fxprune@0.5"]
    assert set(rows[2]["latency"]) == {"1", "2"}
    assert (tmp_path / "b.png").stat().st_size > 5000


def test_viz_from_a_model_and_from_a_saved_report(tmp_path, capsys):
    assert main(["-q", "viz", "resnet18", "--budget", "0.5", "--input-shape", "1,3,32,32",
                 "--out", str(tmp_path / "a")]) == EXIT_OK
    assert (tmp_path / "a" / "resnet18.html").exists()
    report = fxprune.compile(torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 4, 3)),
                             0.5, example_inputs=(torch.randn(1, 3, 8, 8),), round_to=1).meta["fxprune"]
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert main(["-q", "viz", str(tmp_path / "report.json"), "--out", str(tmp_path / "b")]) == EXIT_OK
    assert (tmp_path / "b" / "report.html").exists()


def test_prune_model_from_a_python_file(tmp_path, capsys):
    source = tmp_path / "my_model.py"
    source.write_text(textwrap.dedent("""
        import torch
        def build():
            return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 3),
                                       torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 10))
    """))
    rc = main(["-q", "prune", f"{source}:build", "--budget", "0.6", "--input-shape", "1,3,8,8", "--round-to", "1",
               "--no-bench"])
    assert rc == EXIT_OK
    assert "verification: PASSED" in capsys.readouterr().out


def test_exit_codes_for_bad_input(capsys):
    assert main(["-q", "prune", "resnet18", "--budget", "1.5", "--input-shape", "1,3,64,64"]) == EXIT_INPUT
    assert "(0, 1]" in capsys.readouterr().err
    assert main(["-q", "prune", "resnet18", "--input-shape", "1,3,64,64", "--round-to", "0"]) == EXIT_INPUT
    assert "round_to" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["-q", "prune", "resnet5000"])
    assert info.value.code == 2
    assert "did you mean" in capsys.readouterr().err


def test_analyze_prints_the_groups(capsys):
    assert main(["-q", "analyze", "resnet18", "--input-shape", "1,3,64,64"]) == EXIT_OK
    assert "prunable" in capsys.readouterr().out


def test_prune_and_bench_to_a_latency_budget(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FXPRUNE_CACHE", str(tmp_path / "cache"))
    rc = main(["-q", "prune", "resnet18", "--latency", "0.6", "--input-shape", "1,3,64,64", "--threads", "1",
               "--no-verify", "--no-bench", "--out", str(tmp_path / "out")])
    assert rc == EXIT_OK
    assert "latency: predicted" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["budget"]["latency"] == 0.6 and report["budget"]["flops"] is None
    assert report["latency"]["rounds"] and (tmp_path / "cache" / "latency").is_dir()
    rc = main(["-q", "bench", "resnet18", "--latency", "0.6", "--budgets", "0.5", "--input-shape", "1,3,64,64",
               "--batch-sizes", "1", "--runs", "2", "--warmup", "1", "--threads", "1"])
    assert rc == EXIT_OK
    printed = capsys.readouterr().out
    assert "latency@0.6: predicted" in printed and "measured" in printed
