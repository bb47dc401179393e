"""The one way the tool draws a PNG: matplotlib's Agg canvas directly (no pyplot, no global backend
switch, so it works headless and in any notebook), written with ``core.io.atomic_write``.

matplotlib is imported only when a figure is made: a missing one is an ``ImportError`` there, which
each caller turns into its own message.
"""

from __future__ import annotations

from core.io import atomic_write


def figure(width: float, height: float, dpi: int = 90):
    """A matplotlib ``Figure`` with an Agg canvas attached."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: str) -> None:
    with atomic_write(str(path), "wb") as f:
        fig.savefig(f, format="png")
