"""fxprune.apps.visualize: the graph it builds from a report, the HTML / SVG / PNG it writes, and the page as
a user sees it in headless Chromium (skipped when Chromium is not installed)."""
import copy
import html
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

import fxprune
from fxprune.apps import visualize as viz

torchvision = pytest.importorskip("torchvision")

SVG_NS = "{http://www.w3.org/2000/svg}"


def _prune(name, size=64, budget=0.5, **kwargs):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    return model, fxprune.compile(model, budget, example_inputs=(torch.randn(1, 3, size, size),), verify=False,
                                  **kwargs)


@pytest.fixture(scope="module")
def resnet18():
    # layer1.0.conv1 ignored: a frozen group with a reason of its own, beside the frozen fc output.
    return _prune("resnet18", ignore=["layer1.0.conv1"])


@pytest.fixture(scope="module")
def resnet50():
    return _prune("resnet50")[1]


@pytest.fixture(scope="module")
def densenet121():
    return _prune("densenet121")[1]


# ------------------------------------------------------------------------------------------- graph

def test_graph_nodes_edges_and_widths_match_the_pruned_model(resnet18):
    model, pruned = resnet18
    report = pruned.meta["fxprune"]
    G = viz.pruning_graph(pruned)          # a GraphModule is accepted as well as its report
    assert list(G.nodes) == [n["name"] for n in report["graph"]]
    assert set(G.edges) == {(i, n["name"]) for n in report["graph"] for i in n["inputs"]}
    assert G.has_edge("maxpool", "layer1_0_conv1") and G.has_edge("layer1_0_bn2", "add")

    convs = [v for v, d in G.nodes(data=True) if d["kind"] in ("Conv2d", "Linear")]
    assert len(convs) == 21
    for v in convs:
        d = G.nodes[v]
        dense, small = model.get_submodule(d["target"]), pruned.get_submodule(d["target"])
        dense_w = getattr(dense, "out_channels", getattr(dense, "out_features", None))
        small_w = getattr(small, "out_channels", getattr(small, "out_features", None))
        assert (d["before"], d["after"]) == (dense_w, small_w), v
        assert d["kept"] == pytest.approx(small_w / dense_w)
        assert d["label"] == d["target"]

    conv = G.nodes["layer1_0_conv1"]
    assert conv["target"] == "layer1.0.conv1" and conv["block"] == "layer1.0"
    assert conv["frozen"] and conv["blocked"] and "ignored by the user (layer1.0.conv1)" in conv["reason"]
    assert conv["before"] == conv["after"] == 64
    fc = G.nodes["fc"]
    assert fc["blocked"] and any("graph output" in r for r in fc["reasons"]) and fc["block"] is None
    assert G.nodes["add"]["block"] == "layer1.0"          # a residual add joins the block that computes it
    assert G.nodes["x"]["before"] is None and G.nodes["x"]["drawn"]
    assert len(G.graph["groups"]) == len(report["groups"])


def test_every_group_has_its_own_colour_and_shared_nodes_are_neutral(densenet121):
    report = densenet121.meta["fxprune"]
    colours = viz.group_colours(report)
    assert sorted(colours) == [g["id"] for g in report["groups"]]
    assert len(set(colours.values())) == len(colours) == 121
    assert all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in colours.values())
    G = viz.pruning_graph(report)
    conv = G.nodes["features_denseblock1_denselayer1_conv1"]
    assert conv["colour"] == colours[conv["group"]]
    cats = [d for _, d in G.nodes(data=True) if d["kind"] == "cat" and len(d["groups"]) > 1]
    assert cats and all(d["colour"] == viz.NEUTRAL_FILL and d["group"] is None for d in cats)
    # the densenet concat of a dense layer is drawn inside the layer that reads it
    assert G.nodes["cat_1"]["block"] == "features.denseblock1.denselayer2"


def test_inputs_it_accepts_and_rejects(resnet18, tmp_path):
    report = resnet18[1].meta["fxprune"]
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    assert list(viz.pruning_graph(str(path)).nodes) == list(viz.pruning_graph(report).nodes)
    with pytest.raises(ValueError, match="graph"):
        viz.pruning_graph({"groups": []})
    with pytest.raises(TypeError):
        viz.pruning_graph(42)
    with pytest.raises(ValueError):
        viz.write_svg(report, tmp_path / "x.svg", view="nope")


# -------------------------------------------------------------------------------------------- files

def _boxes(svg_text):
    """(key, x, y, width) of every drawn box of the first view in an SVG/HTML text."""
    out = []
    for m in re.finditer(r'<g class="[^"]*" id="[a-z]\d+" data-k="([^"]+)" data-g="[^"]*" '
                         r'transform="translate\(([-\d.]+),([-\d.]+)\)"><(?:title>.*?</title><)?rect class="box" '
                         r'x="[-\d.]+" y="0" width="([\d.]+)"', svg_text, re.S):
        out.append((html.unescape(m.group(1)), float(m.group(2)), float(m.group(3)), float(m.group(4))))
    return out


def test_html_is_self_contained_and_shows_groups_widths_and_frozen_reasons(resnet18, tmp_path):
    report = copy.deepcopy(resnet18[1].meta["fxprune"])
    # A partly frozen group (not blocked), as a pass that cannot slice some channels would leave it.
    partly = next(g for g in report["groups"] if g["name"] == "layer2_0_conv2")
    # (the "</script>" checks that names and reasons cannot break out of the page's script or markup)
    partly.update(frozen=5, reasons=["blocked by %view_3 (call_method view) </script>"])
    path = viz.write_html(report, tmp_path / "r18.html", title="resnet18 <test>")
    text = path.read_text(encoding="utf-8")
    plain = html.unescape(text)

    assert text.startswith("<!DOCTYPE html>") and "<title>resnet18 &lt;test&gt;</title>" in text
    # nothing fetched from anywhere: no URL at all, no external script/style/image/font
    assert not re.search(r"https?://", text)
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:[a-z]+:)?//""", text, re.I)
    assert not re.search(r"<script[^>]+src=|<link\b|@import|url\((?!#)", text, re.I)
    # every frozen group's reason is on the page, with the groups' colours and kept/size
    for reason in ("ignored by the user (layer1.0.conv1)", "graph output (the model's outputs keep their size)",
                   "blocked by %view_3 (call_method view) </script>"):
        assert reason in plain
    colours = viz.group_colours(report)
    for g in report["groups"]:
        assert colours[g["id"]] in text
        assert f'{g["kept"]}/{g["size"]}' in text
    # node labels: qualnames in SVG <text>, widths before -> after with the kept ratio
    assert ">layer1.0.conv1</text>" in text and ">fc</text>" in text
    conv = viz.pruning_graph(report).nodes["layer2_0_conv1"]
    assert f'Conv2d · {conv["before"]}→{conv["after"]} · {100 * conv["after"] / conv["before"]:.0f}%' in plain
    # frozen boxes are marked (class frz: red dashed border, hatched overlay); the partly frozen group too
    assert re.search(r'<g class="node frz" id="d\d+" data-k="layer1_0_conv1"', text)
    assert re.search(r'<g class="node frz" id="d\d+" data-k="layer2_0_conv2"', text)
    assert 'class="hatch"' in text
    # both views are there; the blocks view has one box per residual block
    blocks = text[text.index('id="view-blocks"'):]
    assert 'data-k="layer1.0"' in blocks and 'data-k="layer1_0_conv1"' not in blocks
    data = json.loads(re.search(r'<script type="application/json" id="fx-data">(.*?)</script>', text, re.S).group(1))
    assert data["blocks"]["layer1.0"]["m"][0] == "layer1_0_conv1"
    assert data["groups"][str(partly["id"])]["reasons"] == partly["reasons"]
    assert text.count("</script>") == 2


def test_svg_is_valid_xml_with_labels_and_no_overlapping_boxes(resnet50, tmp_path):
    path = viz.write_svg(resnet50.meta["fxprune"], tmp_path / "r50.svg")
    root = ET.parse(path).getroot()
    assert root.tag == SVG_NS + "svg" and root.get("viewBox")
    texts = {t.text for t in root.iter(SVG_NS + "text")}
    assert {"layer1.0.conv1", "layer4.2.conv3", "fc", "x"} <= texts
    boxes = _boxes(path.read_text(encoding="utf-8"))
    G = viz.pruning_graph(resnet50)
    assert sorted(b[0] for b in boxes) == sorted(v for v, d in G.nodes(data=True) if d["drawn"])
    by_row = {}
    for key, x, y, w in boxes:
        by_row.setdefault(y, []).append((x - w / 2, x + w / 2, key))
    for row in by_row.values():
        row.sort()
        for (l0, r0, a), (l1, r1, b) in zip(row, row[1:]):
            assert r0 <= l1, f"{a} and {b} overlap"
    # the residual spine is one straight column
    xs = {key: x for key, x, _, _ in boxes}
    assert xs["layer1_0_conv1"] == xs["layer1_0_conv3"] == xs["layer2_0_conv1"] == xs["fc"]


def test_width_chart_png(resnet18, tmp_path):
    image = pytest.importorskip("matplotlib.image")
    path = viz.write_width_chart(resnet18[1], tmp_path / "w.png")
    assert path.stat().st_size > 20_000
    pixels = image.imread(path)
    assert pixels.shape[0] > 400 and pixels.shape[1] > 900
    assert pixels[..., :3].std() > 0.05
    assert len(np.unique((pixels[..., :3] * 15).round().reshape(-1, 3), axis=0)) > 10   # coloured bars


def test_visualize_writes_all_files_and_logs(resnet18, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="fxprune"):
        paths = viz.visualize(resnet18[1], tmp_path / "out", name="r18")
    assert set(paths) == {"html", "svg", "png"}
    assert [p.name for p in paths.values()] == ["r18.html", "r18.svg", "r18_widths.png"]
    assert all(p.stat().st_size > 1000 for p in paths.values())
    assert sum("visualize: wrote" in r.getMessage() for r in caplog.records) == 3


def test_visualize_an_unpruned_model_with_example_inputs(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 4, 3)).eval()
    paths = viz.visualize(model, tmp_path, name="seq", example_inputs=(torch.randn(1, 3, 8, 8),))
    page = paths["html"].read_text()
    assert "16→16" in page or "16&rarr;16" in page or "16 → 16" in page


def test_visualize_without_matplotlib_skips_the_chart(resnet18, tmp_path, monkeypatch, caplog):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)      # import matplotlib... -> ImportError
    with pytest.raises(ImportError, match="pip install matplotlib"):
        viz.write_width_chart(resnet18[1], tmp_path / "w.png")
    with caplog.at_level(logging.WARNING, logger="fxprune"):
        paths = viz.visualize(resnet18[1].meta["fxprune"], tmp_path, name="m")
    assert set(paths) == {"html", "svg"} and not (tmp_path / "m_widths.png").exists()
    assert any("pip install matplotlib" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------------ browser

def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("Chromium not found: install Debian packages chromium and chromium-driver to run the browser test")


def _run_chromium(exe, tmp_path, url, *args):
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)     # fresh, never the user's
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--hide-scrollbars",
           "--window-size=1400,900", *args, url]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"Chromium did not finish in 60 s: {' '.join(cmd)}")
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


# Dispatched by a copy of the page as a user's wheel / drag / hover / clicks would be; results in <pre>.
PROBE = """<script>
window.addEventListener('load', function () { setTimeout(function () {
  var out = {}, svg = document.getElementById('canvas'), vp = document.getElementById('viewport');
  try {
    out.t0 = vp.getAttribute('transform');
    var r = svg.getBoundingClientRect();
    svg.dispatchEvent(new WheelEvent('wheel', {deltaY: -300, clientX: r.left + 300, clientY: r.top + 300,
                                              bubbles: true, cancelable: true}));
    out.zoomed = vp.getAttribute('transform');
    svg.dispatchEvent(new PointerEvent('pointerdown', {button: 0, clientX: 500, clientY: 500, bubbles: true}));
    window.dispatchEvent(new PointerEvent('pointermove', {clientX: 540, clientY: 560, bubbles: true}));
    window.dispatchEvent(new PointerEvent('pointerup', {clientX: 540, clientY: 560, bubbles: true}));
    out.panned = vp.getAttribute('transform');
    var node = document.querySelector('.view.on g[data-k="layer1_0_conv2"]'), b = node.getBoundingClientRect();
    node.querySelector('rect').dispatchEvent(new MouseEvent('mousemove', {clientX: b.left + 5, clientY: b.top + 5,
                                                                          bubbles: true}));
    out.tip = document.getElementById('tip').style.display + '|' + document.getElementById('tip').textContent;
    out.lit = document.querySelectorAll('.view.on g.hl').length;
    document.getElementById('v-blocks').click();
    out.status = document.getElementById('status').textContent;
    document.getElementById('b-fit').click();
    out.fit = vp.getAttribute('transform');
  } catch (e) { out.error = String(e); }
  var pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
}, 50); });
</script>"""


@pytest.mark.parametrize("model, label, block", [
    ("resnet50", "layer1.0.conv1", "layer1.0"),
    ("densenet121", "features.denseblock1.denselayer1.conv1", "features.denseblock1.denselayer1"),
])
def test_page_in_headless_chromium(model, label, block, request, tmp_path):
    exe = _chromium()
    pruned = request.getfixturevalue(model)
    page = viz.write_html(pruned.meta["fxprune"], tmp_path / f"{model}.html", title=model)
    assert page.stat().st_size < 3_000_000

    # The page's own script ran to the end, and its search found the node in the live DOM and described it.
    dom = _run_chromium(exe, tmp_path, f"{page.as_uri()}#view=detail&focus={label}", "--dump-dom")
    assert 'data-fxprune-ready="detail"' in dom
    status = re.search(r'<div id="status">(.*?)</div>', dom).group(1)
    assert re.search(r"Detail view · \d+ boxes · zoom \d+% · match 1/\d+", status), status
    sel = re.search(r'<div id="sel"[^>]*>(.*?)</div>\s*<div class="help">', dom, re.S).group(1)
    assert label in sel and "channel group" in sel
    assert f">{label}</text>" in dom and f">{block}</text>" in dom

    # What a user sees: a coloured graph beside the side panel, not a blank or error page.
    shot = tmp_path / f"{model}.png"
    _run_chromium(exe, tmp_path, page.as_uri(), f"--screenshot={shot}")
    image = pytest.importorskip("matplotlib.image")
    pixels = image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (900, 1400)
    graph = pixels[:, :1000]
    assert graph.std() > 0.04                                # a blank page has 0
    colours = np.unique((graph * 7).round().reshape(-1, 3), axis=0)
    assert len(colours) >= 12, f"only {len(colours)} distinct colours in the graph area"
    assert (graph.mean(axis=2) < 0.5).mean() > 0.005        # dark text and borders are drawn

    if model == "resnet50":   # interactions: wheel zoom, drag pan, hover tooltip + group highlight, view, fit
        probe = tmp_path / "probe.html"
        probe.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
        dom = _run_chromium(exe, tmp_path, probe.as_uri() + "#view=detail", "--dump-dom")
        out = json.loads(html.unescape(re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S).group(1)))
        assert "error" not in out, out
        scale = lambda t: float(re.search(r"scale\(([\d.e-]+)\)", t).group(1))   # noqa: E731
        assert scale(out["zoomed"]) > scale(out["t0"]) * 1.2
        assert out["panned"] != out["zoomed"] and scale(out["panned"]) == scale(out["zoomed"])
        assert out["tip"].startswith("block|layer1.0.conv2") and "Conv2d" in out["tip"]
        assert out["lit"] >= 3                                # conv2, bn2, relu of the same group
        assert out["status"].startswith("Blocks view · 25 boxes")
        assert scale(out["fit"]) < 1
