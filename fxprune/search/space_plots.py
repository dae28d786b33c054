"""Pictures of pruning-space populations (ALGORITHMS.md 3): EDF curves of several spaces side by side,
and each sample's error against its parameter count coloured by its FLOPs-to-parameter ratio.

    plot_edfs({"initial": {...}, "refined": {...}}, "edf.png")     -> plain and FLOPs-normalised EDFs
    plot_error_vs_params(samples, "scatter.png", rho_star, delta)  -> where the good ratio lies

matplotlib is optional: it is imported inside each function, and only the Agg canvas is used (no pyplot),
so drawing never switches the caller's backend or opens a window.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from .space_stats import edf_curve, flops_normalized_weights, sample_ratio

__all__ = ["plot_edfs", "plot_error_vs_params"]

# Rounds named by the search driver get fixed markers so initial and refined read the same in every plot.
_ROUND_MARKERS = {"initial": "o", "refined": "^"}
_OTHER_MARKERS = ["s", "D", "v", "P", "X", "<", ">", "h"]


def _matplotlib(caller: str):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # matplotlib is an optional dependency: only these pictures need it
        raise ImportError(f"{caller} needs matplotlib: pip install matplotlib") from e
    return Figure, FigureCanvasAgg


def _step(ax, x: np.ndarray, y: np.ndarray, right: float, **kwargs) -> None:
    """Draw an EDF from (x[0], 0), stepping up at each error, and carry it flat at 1 to `right` so every
    curve of a panel ends at the same place and a short population does not look truncated."""
    xs = np.concatenate([[x[0]], x, [max(right, x[-1])]])
    ys = np.concatenate([[0.0], y, [1.0]])
    ax.step(xs, ys, where="post", **kwargs)


def plot_edfs(populations: Dict[str, dict], path: str, title: str = "") -> str:
    """Write a PNG with two panels: the plain EDF (left) and the FLOPs-normalised EDF (right, weights from
    `flops_normalized_weights`) of every population, one step curve each, errors in %.

    populations maps a label to {"errors": [...], "flops": [...]} (errors as fractions, as the space
    statistics use them). The legend gives each label with its sample count; an empty population keeps its
    legend entry (n=0) but draws no curve. Returns path.
    """
    Figure, FigureCanvasAgg = _matplotlib("plot_edfs")
    curves = []
    for label, pop in populations.items():
        if "errors" not in pop or "flops" not in pop:
            raise ValueError(f"population {label!r} needs both 'errors' and 'flops', got keys {sorted(pop)}")
        errors = np.asarray(pop["errors"], dtype=float) * 100.0
        flops = np.asarray(pop["flops"], dtype=float)
        if errors.shape != flops.shape:
            raise ValueError(f"population {label!r}: errors and flops must have the same length, "
                             f"got {errors.shape} and {flops.shape}")
        curves.append((label, errors, flops))
    right = max((float(e.max()) for _, e, _ in curves if e.size), default=1.0)

    fig = Figure(figsize=(11.0, 4.5), dpi=110)   # no pyplot: no global state in the caller's process
    FigureCanvasAgg(fig)
    panels = [(fig.add_subplot(1, 2, 1), "EDF", False),
              (fig.add_subplot(1, 2, 2), "FLOPs-normalised EDF", True)]
    for ax, panel_title, normalised in panels:
        for i, (label, errors, flops) in enumerate(curves):
            style = {"color": f"C{i % 10}", "lw": 1.8, "label": f"{label} (n={errors.size})"}
            if errors.size == 0:
                ax.plot([], [], **style)
                continue
            weights = flops_normalized_weights(flops) if normalised else None
            x, y = edf_curve(errors, weights)
            _step(ax, x, y, right, **style)
        ax.set_title(panel_title)
        ax.set_xlabel("top-1 error (%)")
        ax.set_ylabel("cumulative fraction" + (" (FLOPs-weighted)" if normalised else ""))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return str(path)


def plot_error_vs_params(samples: List[dict], path: str, rho_star: Optional[float] = None,
                         delta: Optional[float] = None, title: str = "") -> str:
    """Write a PNG scatter of every sample's parameters (M) against its top-1 error (%), coloured by
    rho = flops / params (one colour scale for all rounds, with a colorbar) and with one marker per round
    ('o' initial, '^' refined, others in order of appearance).

    samples are dicts with "params", "flops", "error" (a fraction) and "round" (str or int). With rho_star
    the title states rho* (and +-delta), and when delta < 1 the params band of the refined space at the
    samples' median FLOPs is shaded: within a regime FLOPs are nearly constant, so the ratio band is a
    params band. Returns path.
    """
    Figure, FigureCanvasAgg = _matplotlib("plot_error_vs_params")
    for i, s in enumerate(samples):
        missing = [k for k in ("params", "flops", "error", "round") if k not in s]
        if missing:
            raise ValueError(f"samples[{i}] lacks {', '.join(missing)}")
    params = np.array([float(s["params"]) for s in samples])
    flops = np.array([float(s["flops"]) for s in samples])
    errors = np.array([float(s["error"]) for s in samples]) * 100.0
    rounds = [str(s["round"]) for s in samples]
    rho = sample_ratio(flops, params) if samples else np.zeros(0)

    fig = Figure(figsize=(7.5, 5.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    vmin, vmax = (float(rho.min()), float(rho.max())) if rho.size else (0.0, 1.0)
    spare = iter(_OTHER_MARKERS * (1 + len(set(rounds)) // len(_OTHER_MARKERS)))
    scatter = None
    for name in dict.fromkeys(rounds):   # rounds in order of first appearance
        marker = _ROUND_MARKERS.get(name) or next(spare)
        idx = [i for i, r in enumerate(rounds) if r == name]
        scatter = ax.scatter(params[idx] / 1e6, errors[idx], c=rho[idx], cmap="viridis", vmin=vmin, vmax=vmax,
                             marker=marker, s=36, edgecolors="k", linewidths=0.4, label=f"{name} (n={len(idx)})")
    heading = title
    if rho_star is not None:
        ratio = f"\u03c1* = {rho_star:.4g} FLOPs/param" + (f", band \u00b1{delta:.0%}" if delta is not None else "")
        heading = f"{title}\n{ratio}" if title else ratio
        if delta is not None and 0 <= delta < 1 and flops.size:
            f_mid = float(np.median(flops))
            lo, hi = f_mid / (rho_star * (1 + delta)), f_mid / (rho_star * (1 - delta))
            ax.axvspan(lo / 1e6, hi / 1e6, color="tab:orange", alpha=0.15, lw=0,
                       label="refined band (median FLOPs)")
    if scatter is not None:
        fig.colorbar(scatter, ax=ax, label="FLOPs / params")
        legend = ax.legend(loc="best", fontsize=8, title="round")
        for handle in legend.legend_handles:
            if hasattr(handle, "set_sizes"):   # scatter markers: their shape is what the legend explains
                handle.set_array(None)         # else the colormap repaints the face at draw time
                handle.set_facecolor("0.7")
    if heading:
        ax.set_title(heading)
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("top-1 error (%)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return str(path)
