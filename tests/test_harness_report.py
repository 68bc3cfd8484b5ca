"""harness/report.py: the tables' cells and the report's tables from stored runs."""
import math

import pytest

import compare
from harness import report


def stored_run(**changes):
    """A stored run of this protocol as run_one makes it, with some fields changed."""
    run = dict(model="attention", task="copy", lr=0.003, seed=0, protocol=compare.PROTOCOL, params=1000,
               state_size={"6": 10}, examples_seen=32, final_loss=0.5, val_token_acc=0.9, val_loss=0.4,
               wall_time_s=1.0, diverged_at=None, metrics={"6": {"token_acc": 0.9, "loss": 0.4, "exact": None}})
    return {**run, **changes}


def test_the_report_gives_the_mazes_path_bins_size_by_size():
    """The maze's table by path length: one row per model and maze size, never pooled over sizes (larger mazes
    have longer paths, so pooled bins would mix sizes: two seeds' rates at 8x8 are 1.0 and 0.0, kept apart from
    6x6's); a bin no maze of a size falls in is left empty; the first bin starts at min_path, the shortest path
    drawn."""
    runs = []
    for seed, rate in [(0, 1.0), (1, 0.0)]:
        metrics = {"6": {"token_acc": 0.9, "exact": 0.5, "by_path": {"20": [0.5, 4]}},
                   "8": {"token_acc": 0.9, "exact": 0.5, "by_path": {"20": [rate, 2], "40": [0.0, 3]}}}
        runs.append(stored_run(model="hrm", task="maze", test=[6, 8], train=[6, 6], steps=10, batch_size=4,
                               seed=seed, task_options={"min_path": 30}, state_size={"6": 1, "8": 1},
                               metrics=metrics))
    meta = dict(preset="depth", command="test", device_name="CPU", torch="-", commit="-", lrs=[0.003])
    text, figures = report.report(runs, meta, ["maze"], ["hrm"], compare)
    assert ("| model | size | 30-39 | 40-59 |\n|---|---|---|---|\n| hrm | 6x6 | 0.50±0.00 |  |\n"
            "| hrm | 8x8 | 0.50±0.50 | 0.00±0.00 |") in text
    assert figures["depth"][0]["xs"] == [20, 40]


def test_mean_spread_is_the_mean_and_half_the_range_over_seeds():
    """The tables' cells: mean ± half of (highest - lowest), the ± only with two seeds or more; diverged seeds counted
    beside, and a cell with no run at all empty."""
    assert report.mean_spread([0.2, 0.6, 0.4]) == "0.40±0.20"
    assert report.mean_spread([0.5, None]) == "0.50"
    assert report.mean_spread([0.3, compare.DIVERGED, 0.5]) == "0.40±0.10 (1 diverged)"
    assert report.mean_spread([compare.DIVERGED]) == compare.DIVERGED and report.mean_spread([None]) == ""


def test_mean_is_over_the_numbers_only():
    """A metric over seeds (the figures' points): None (no such metric) and "diverged" are left out; nothing left is
    nan."""
    assert report.average([0.25, None, 0.75, compare.DIVERGED, 0.5]) == 0.5
    assert math.isnan(report.average([None, compare.DIVERGED])) and math.isnan(report.average([]))


def test_mean_spread_counts_each_label_apart():
    assert report.mean_spread([0.5, "diverged", "out of memory"]) == "0.50 (1 diverged) (1 out of memory)"
    assert report.mean_spread(["diverged", "out of memory"]) == "diverged, out of memory"


def test_equal_lines_show_side_by_side_and_the_legend_covers_no_panel(tmp_path, monkeypatch):
    """Two models at the same values: each its own marker, their points apart on the page at the same y (one does not
    hide the other); the figure says what it plots, and the legend sits beside the panels, over none of them."""
    plt = report.pyplot()
    if plt is None:
        return
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)   # keeps the figure to look at
    panel = dict(title="flipflop", xs=[32, 256], lines={"ssm": [[1.0], [1.0]], "titans": [[1.0], [1.0]]}, ylim=(0, 1))
    report.plot(str(tmp_path / "f.png"), [panel, dict(panel, title="again")], compare.MODELS,
                report.CAPTIONS["length"])
    (fig,) = figures
    axes = fig.axes
    ssm, titans = axes[0].get_lines()
    assert ssm.get_marker() != titans.get_marker() and list(ssm.get_ydata()) == list(titans.get_ydata()) == [1.0, 1.0]
    (x0, y0), (x1, y1) = ssm.get_transform().transform((32, 1.0)), titans.get_transform().transform((32, 1.0))
    assert y0 == y1 and abs(x0 - x1) >= 3 * fig.dpi / 72                    # 4 points apart, more than 3
    legend = axes[-1].get_legend().get_window_extent()
    assert not any(legend.overlaps(ax.get_window_extent()) for ax in axes)
    assert "band" in fig._suptitle.get_text() and "chance" in fig._suptitle.get_text()


def test_a_long_title_wraps_above_the_panels_and_widens_no_figure(tmp_path, monkeypatch):
    """Where the runs were made can take several hundred characters (five commits): the title wraps to the figure's
    width instead of widening the saved image (which the README shows at a fixed width, shrinking the panels), and
    sits above the panels and their titles, over none of them."""
    pytest.importorskip("matplotlib")
    import matplotlib.image
    figures = []
    monkeypatch.setattr(report.pyplot(), "close", figures.append)   # keeps each figure to look at
    panel = dict(title="flipflop", xs=[32, 256], lines={"ssm": [[1.0], [0.9]], "titans": [[1.0], [0.8]]}, ylim=(0, 1))
    widths = {}
    for name, title in (("short", "one GPU"), ("long", "; ".join(f"one GPU, commit {i:07x} (9 runs)" for i in range(12)))):
        report.plot(str(tmp_path / f"{name}.png"), [panel, dict(panel, title="again")], compare.MODELS, title)
        widths[name] = matplotlib.image.imread(tmp_path / f"{name}.png").shape[1]
    assert abs(widths["long"] - widths["short"]) <= 4, widths
    short, long = (f.axes[0].get_position().height for f in figures)
    assert long == pytest.approx(short), "the title took room from the panels"
    fig = figures[-1]
    renderer = fig.canvas.get_renderer()
    top = max(ax.get_tightbbox(renderer).y1 for ax in fig.axes)   # the panels with their titles
    assert "\n" in fig._suptitle.get_text() and fig._suptitle.get_window_extent(renderer).y0 >= top


def test_the_budget_table_gives_each_stage_its_batch_and_names_the_walls():
    """A curriculum whose long stages take fewer streams shows a batch per stage; the budget is the whole one (a model
    that stopped at its wall does not stand for the task), and each wall is named with its stages, steps and why."""
    plan = [[33, 64], [2048, 2048], [8192, 8192]]
    common = dict(task="babilong_qa1", test=[512], batch_size=128, tokens_per_step=2 ** 18, task_options={},
                  state_size={"512": 10}, metrics={"512": {"token_acc": 0.9, "loss": 0.4, "exact": 0.9,
                                                           "by_depth": [0.9] * 4}})
    runs = [stored_run(model="rmt", train=plan[:2], steps=20, train_wall="time: too slow", **common),
            stored_run(model="ssm", train=plan, steps=30, **common)]
    meta = dict(preset="scale", command="test", device_name="CPU", torch="-", commit="-", lrs=[0.003])
    text, _ = report.report(runs, meta, ["babilong_qa1"], ["rmt", "ssm"], compare)
    assert ("| babilong_qa1 | 30 | 128, 128, 32 (a stage's lr x sqrt(batch / 128)) | 33-64, 2048, 8192 (a third of the "
            "steps each) | 512 | - |") in text
    assert "- rmt on babilong_qa1 stops at its wall, after the stages up to 2,048 tokens (20 steps): time: too slow" \
        in text
    runs = [stored_run(model="rmt", train=plan[:2], steps=[15, 5], train_wall="time: too slow", **common),
            stored_run(model="ssm", train=plan, steps=[15, 5, 5], **common)]   # a count of steps a stage: in all
    text, _ = report.report(runs, meta, ["babilong_qa1"], ["rmt", "ssm"], compare)
    assert ("| babilong_qa1 | 25 | 128, 128, 32 (a stage's lr x sqrt(batch / 128)) | 33-64, 2048, 8192 (15, 5, 5 "
            "steps) | 512 | - |") in text
    assert "up to 2,048 tokens (20 steps): time: too slow" in text and "| ssm | babilong_qa1 |" in text
    assert [row.split(" | ")[6] for row in text.splitlines() if row.startswith("| ssm | babilong_qa1")] == ["25"]


def test_publish_writes_the_report_and_removes_figures_it_does_not_draw(tmp_path, monkeypatch, capsys):
    """A narrower command on the same --out draws fewer figures: an earlier report's figure that this one does not
    draw (here the trade-off) is removed, not left beside a report that leaves its runs out."""
    for name in ("length", "tradeoff"):
        (tmp_path / f"smoke_{name}.png").write_text("an earlier report's")
    (tmp_path / "smoke_notes.png").write_text("not a report's")
    drawn = []
    monkeypatch.setattr(report, "plot", lambda path, *a: drawn.append(path) or open(path, "w").close())
    meta = dict(preset="smoke", path=str(tmp_path / "smoke.json"), device_name="CPU", commit="-")
    report.publish("# the report", {"length": []}, [stored_run()], meta, compare)
    assert drawn == [str(tmp_path / "smoke_length.png")] and (tmp_path / "smoke_length.png").read_text() == ""
    assert not (tmp_path / "smoke_tradeoff.png").exists() and (tmp_path / "smoke_notes.png").exists()
    assert (tmp_path / "smoke.md").read_text() == "# the report"
    assert capsys.readouterr().out == f"# the report\nreport: {tmp_path / 'smoke.md'}\n"
