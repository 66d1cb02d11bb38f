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


# -- issue 24, trap 11 -----------------------------------------------------------------------------------

def test_benign_only_panels_say_so_and_have_no_target_column(captured, tmp_path):
    h = w = 4
    ben = Panel(index=np.array([5, 7]), images=np.zeros((2, h, w, 3), np.uint8), gt=np.full((2, h, w), 1, np.uint8),
                target=None, before=np.full((2, h, w), 1, np.uint8), after=np.full((2, h, w), 3, np.uint8),
                rejected=None)
    r = row("d", {"ASR": None, "mIoU-B": 70.0}, {"ASR": None, "mIoU-B": 60.0}, benign_panel=ben)
    assert plots.panels(tmp_path / "p.png", [r], CLASSES) is not None
    (fig,) = captured
    title = fig._suptitle.get_text()
    assert "benign test images" in title and "attacked" not in title.replace("no attacked test set", "")
    grid = np.array(fig.axes).reshape(2, 4)  # image, benign label, before, after d: no "not attacked" column
    assert [ax.get_title().split("\n")[0] for ax in grid[0]] == ["image", "benign label", "before defense", "after d"]
    assert not [t for ax in fig.axes for t in ax.texts if t.get_text() == "not attacked"]


def test_bar_labels_are_readable_with_one_decimal(captured, tmp_path):
    rows = [row("a", {"ASR": 99.86, "mIoU-B": 70.04}, {"ASR": 0.04, "mIoU-B": 69.95})]
    assert plots.bars(tmp_path / "b.png", rows) is not None
    (fig,) = captured
    labels = {t.get_text(): t.get_fontsize() for ax in fig.axes for t in ax.texts}
    assert set(labels) == {"99.9", "0.0", "70.0"}  # 69.95 rounds to 70.0 (half to even on the binary value)
    assert "99.9" in labels and "100" not in labels and min(labels.values()) >= 8


def test_pruning_curve_marks_the_kept_point_and_the_result_after_fine_tuning(captured, tmp_path):
    curve = [{"fraction": f, "miou_clean": 0.8 - f / 2, "asr": 90.0 - 100 * f, "miou_b": 70.0 - 10 * f}
             for f in (0.0, 0.1, 0.2, 0.3)]
    r = row("fine-pruning", {"ASR": 90.0, "mIoU-B": 70.0}, {"ASR": 12.5, "mIoU-B": 68.5},
            details={"curve": curve, "pruned_fraction": 0.2, "miou_clean_final": 0.77})
    assert plots.curve(tmp_path / "c.png", r) is not None
    (fig,) = captured
    (ax,) = fig.axes
    vlines = [ln for ln in ax.lines if list(ln.get_xdata()) == [20.0, 20.0]]
    assert len(vlines) == 1 and "kept: 20.0% pruned" in vlines[0].get_label()
    stars = sorted(round(float(ln.get_ydata()[0]), 6) for ln in ax.lines if ln.get_marker() == "*")
    assert stars == [12.5, 68.5, 77.0]  # ASR and mIoU-B after, clean mIoU after fine-tuning (percent)
    assert all(ln.get_xdata()[0] == 20.0 for ln in ax.lines if ln.get_marker() == "*")
