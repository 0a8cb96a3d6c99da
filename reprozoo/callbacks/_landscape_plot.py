"""The figures of a :class:`~reprozoo.callbacks.landscape.LossLandscape` result: a line plot for a 1-d landscape, a
contour and a 3-D surface for a 2-d one (Matplotlib's Agg canvas, outside pyplot)."""

from __future__ import annotations

from typing import Any

import numpy as np


def landscape_figures(result: dict[str, Any], dim: int, title: str = "") -> dict[str, Any]:
    """Matplotlib figures (Agg canvas, outside pyplot) of a :meth:`compute` result: ``{"line"}`` for 1-d,
    ``{"contour", "surface"}`` for 2-d."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x, z = result["x"], result["loss"]
    if dim == 1:
        fig = Figure(figsize=(6, 4), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot(x, z, color="tab:blue", label="loss")
        ax.set_xlabel("step along direction 1")
        ax.set_ylabel("loss")
        if "accuracy" in result:
            ax2 = ax.twinx()
            ax2.plot(x, result["accuracy"], color="tab:orange", label="accuracy")
            ax2.set_ylabel("accuracy")
        ax.set_title(f"Loss along a random direction ({title})")
        return {"line": fig}
    X, Y = np.meshgrid(x, result["y"])
    contour = Figure(figsize=(5.5, 5), layout="constrained")
    FigureCanvasAgg(contour)
    ax = contour.add_subplot()
    finite = z[np.isfinite(z)]
    levels = np.linspace(finite.min(), finite.max(), 30) if finite.size and finite.max() > finite.min() else 10
    cs = ax.contour(X, Y, z, levels=levels, cmap="viridis")
    ax.clabel(cs, inline=True, fontsize=6, fmt="%.2g")
    ax.plot([0], [0], "r+", markersize=10)
    ax.set_xlabel("direction 1")
    ax.set_ylabel("direction 2")
    ax.set_title(f"Loss contours ({title})")
    surface = Figure(figsize=(6, 5), layout="constrained")
    FigureCanvasAgg(surface)
    ax3 = surface.add_subplot(projection="3d")
    ax3.plot_surface(X, Y, z, cmap="viridis", linewidth=0, antialiased=True)
    ax3.set_xlabel("direction 1")
    ax3.set_ylabel("direction 2")
    ax3.set_zlabel("loss")
    ax3.set_title(f"Loss surface ({title})")
    return {"contour": contour, "surface": surface}
