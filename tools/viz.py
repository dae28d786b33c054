#!/usr/bin/env python
"""Draw a model's channel groups and what pruning cut: the same as `fxprune viz`.

  python tools/viz.py resnet50 --budget 0.5 --out viz/      # prune, then draw
  python tools/viz.py out/report.json --out viz/            # draw a saved report (or a pruned.pt)

Writes a self-contained HTML page (pan, zoom, hover for widths; works offline), a static SVG and a
per-layer width bar chart (PNG, needs matplotlib). `--help` lists every option."""
import sys

from fxprune.apps.cli import main

if __name__ == "__main__":
    sys.exit(main(["viz", *sys.argv[1:]]))
