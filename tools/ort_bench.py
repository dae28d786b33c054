#!/usr/bin/env python
"""onnxruntime latency of a dense model against pruned versions: the same as `fxprune bench`.

  python tools/ort_bench.py resnet50 --budgets 1.0,0.75,0.5,0.25 --batch-sizes 1,32 --json bench.json --plot bench.png

Every model is exported to ONNX (opset 17, dynamic batch, cleaned with onnx-graphsurgeon, checked with
onnx.checker), compared with torch in onnxruntime, then timed: warm-up runs, then dense and pruned runs
interleaved, median and interquartile range per batch size. `--help` lists every option."""
import sys

from fxprune.apps.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
