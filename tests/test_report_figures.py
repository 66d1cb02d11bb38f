"""The bench's figures, checked on the drawn matplotlib objects: what is shown, and that nothing hides a bar."""

from __future__ import annotations

import numpy as np
import pytest

from testbed.bench import plots
from testbed.evaluation.rows import DefenseRow, Panel

CLASSES = ["wall", "building", "sky", "road"]


@pytest.fixture
def captured(monkeypatch):
    """The figures the drawers make, kept open instead of saved."""
    figs = []

    def keep(fig, path):
        figs.append(fig)
        return path

    monkeypatch.setattr(plots, "_save", keep)
    yield figs
    import matplotlib.pyplot as plt

    for f in figs:
        plt.close(f)


def row(defense: str, before: dict, after: dict | None, **kw) -> DefenseRow:
    return DefenseRow(model="m", attack="fgba-n-to-1", defense=defense, run="r", data="d", before=before, after=after, **kw)


def _overlaps(a, b) -> bool:
    return not (a.x1 <= b.x0 or b.x1 <= a.x0 or a.y1 <= b.y0 or b.y1 <= a.y0)


def test_bars_legend_never_covers_a_full_bar(captured, tmp_path):
    full = {"ASR": 100.0, "mIoU-B": 100.0}
    rows = [row("a", full, full), row("b", full, {"ASR": 0.0, "mIoU-B": 100.0}, after_random={"ASR": 100.0, "mIoU-B": 100.0})]
    assert plots.bars(tmp_path / "b.png", rows) is not None
    (fig,) = captured
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["before", "after", "after, random-removal control"]
    box = legend.get_window_extent(renderer)
    for ax in fig.axes:
        assert ax.get_legend() is None
        assert not _overlaps(box, ax.get_window_extent(renderer)), "the legend overlaps an axes"


def test_bars_of_a_benign_model_have_no_asr_panel(captured, tmp_path):
    none = {"ASR": None, "mIoU-B": 70.0}
    assert plots.bars(tmp_path / "b.png", [row("a", none, {"ASR": None, "mIoU-B": 68.0})]) is not None
    (fig,) = captured
    assert [ax.get_title() for ax in fig.axes] == ["mIoU-B"]
    assert "no attacked test set" in fig._suptitle.get_text()


def test_panels_show_benign_images_uniform_columns_and_ignore(captured, tmp_path):
    h = w = 4
    att = Panel(index=np.arange(2), images=np.zeros((2, h, w, 3), np.uint8), gt=np.full((2, h, w), 2, np.uint8),
                target=np.zeros((2, h, w), np.uint8), before=np.zeros((2, h, w), np.uint8),
                after=np.full((2, h, w), 3, np.uint8), rejected=np.array([False, False]))
    att.gt[0, 0, 0] = 255  # an ignore pixel
    ben = Panel(index=np.array([5, 7]), images=np.zeros((2, h, w, 3), np.uint8), gt=np.full((2, h, w), 1, np.uint8),
                target=None, before=np.full((2, h, w), 1, np.uint8), after=np.full((2, h, w), 3, np.uint8),
                rejected=np.array([True, False]))
    r = row("d", {"ASR": 99.0, "mIoU-B": 70.0}, {"ASR": 1.0, "mIoU-B": 60.0}, panel=att, benign_panel=ben)
    assert plots.panels(tmp_path / "p.png", [r], CLASSES) is not None
    (fig,) = captured
    grid = np.array(fig.axes).reshape(4, 5)
    assert [ax.get_ylabel() for ax in grid[:, 0]] == ["attacked #0", "attacked #1", "benign #5", "benign #7"]
    titles = [ax.get_title() for ax in grid[0]]
    assert titles[2] == "target label\n(all wall)"  # an all-one-colour N-to-1 target says so
    assert titles[4] == "after d\n(all road)"
    texts = [t.get_text() for ax in grid[2:, 2] for t in ax.texts]
    assert texts == ["not attacked", "not attacked"]
    assert [t.get_text() for t in grid[2, 4].texts] == ["rejected"]  # a benign input the filter rejected
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["wall", "building", "sky", "road", "ignore (255)"]
