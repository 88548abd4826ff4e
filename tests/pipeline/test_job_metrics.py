"""The job metrics plot (pipeline/metrics/job.py JobMetrics.plot) reads well whatever the lengths:
all-equal prompt lengths, one document, QA rows sharing a length, a wide range."""

from __future__ import annotations

import pytest

from pipeline.metrics.job import JobMetrics

GiB = 1 << 30
DCA = {"dca_enabled": True, "dca_pretraining_length": 8192}


def _metrics(points, *, task="summarize", max_input_tokens=16384, dca=DCA, kinds=("cpu_peak_rss",)):
    m = JobMetrics(job_id=f"{task}-0123", task=task, total_input_rows=len(points),
                   config={"max_input_tokens": max_input_tokens, "dca_in_effect": dca})
    m.points = list(points)
    m.memory_kinds = set(kinds)
    return m


@pytest.fixture
def figures(monkeypatch):
    """The figures plot() draws, kept open for inspection."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.append(fig))
    yield kept
    for fig in kept:
        close(fig)


# (prompt tokens, latency, prefill, peak memory, device-seconds) per row
CASES = {
    "all_equal": [(2048, 7.0 + i * 0.3, 4.1, int(1.05 * GiB), 1.5) for i in range(6)],
    "one_document": [(12491, 240.0, 170.0, int(1.9 * GiB), 60.0)],
    "qa_rows": [(1040, 3.0 + q, 1.1, int(0.9 * GiB), 0.4) for q in range(3)] + [(2050, 5.0 + q, 2.0, int(0.95 * GiB), 0.8)
                                                                               for q in range(2)],
    "wide_range": [(n, n / 200, n / 300, int((0.8 + n / 40000) * GiB), n / 1000) for n in range(200, 30000, 700)],
    "no_memory": [(3000, 10.0, None, None, 2.0), (5000, 20.0, None, None, 3.5)],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_axes_start_at_zero_and_show_the_trained_length(case, figures, tmp_path):
    points = CASES[case]
    path = tmp_path / f"{case}.png"
    _metrics(points, task="qa" if case == "qa_rows" else "summarize").plot(str(path))
    assert path.stat().st_size > 10_000 and path.read_bytes()[:4] == b"\x89PNG"
    (fig,) = figures
    device, memory = fig.axes
    longest = max(p[0] for p in points)
    for ax in (device, memory):
        left, right = ax.get_xlim()
        bottom, top = ax.get_ylim()
        assert left == 0 and bottom == 0  # a 5% difference is drawn as 5%, not as the whole height
        assert right >= max(longest, 8192)  # P is on the axis: where the plain model leaves its training
        assert any("pretraining_length P = 8,192" in t.get_text() for t in fig.legends[0].get_texts())
    assert top >= max(p[3] or 0 for p in points) / GiB
    assert device.get_title().startswith("Device time per row") and f"({len(points)} row" in device.get_title()
    assert device.get_ylim()[1] >= max(p[4] for p in points)
    if case in ("all_equal", "qa_rows"):
        assert "prompt length" in device.get_title().split("(")[1]  # "6 rows, 1 prompt length"


def test_the_left_panel_is_device_time_not_latency(figures, tmp_path):
    """Under continuous batching a short document waits in the batch of long ones, so its latency
    says nothing about its prompt: the panel draws each row's device-seconds, and says how many
    rows had them (outputs written before the column have none)."""
    points = [(500, 900.0, 800.0, GiB, 0.5), (4000, 900.0, 810.0, GiB, 4.0), (8000, 905.0, 820.0, GiB, None)]
    _metrics(points).plot(str(tmp_path / "device.png"))
    device = figures[0].axes[0]
    (drawn,) = device.collections
    assert sorted(map(tuple, drawn.get_offsets().tolist())) == [(500.0, 0.5), (4000.0, 4.0)]
    assert "(2 rows of 3" in device.get_title() and "device-seconds" in device.get_ylabel()
    assert device.get_ylim()[1] < 900  # latencies are not drawn


def test_prompt_limit_is_drawn_only_near_the_data(figures, tmp_path):
    _metrics([(2048, 5.0, 3.0, GiB, 1.0)] * 3, max_input_tokens=2048).plot(str(tmp_path / "capped.png"))
    _metrics([(2048, 5.0, 3.0, GiB, 1.0)] * 3, max_input_tokens=32768).plot(str(tmp_path / "far.png"))
    capped, far = (fig.legends[0].get_texts() for fig in figures)
    assert any("--max-input-tokens 2,048" in t.get_text() for t in capped)
    assert not any("max-input-tokens" in t.get_text() for t in far)
    assert figures[1].axes[0].get_xlim()[1] < 32768  # the points are not squeezed into a corner


def test_without_dca_there_is_no_trained_length_line(figures, tmp_path):
    _metrics([(500, 1.0, 0.5, GiB, 0.3)], dca={"dca_enabled": False}).plot(str(tmp_path / "plain.png"))
    assert not any("pretraining_length" in t.get_text() for t in figures[0].legends[0].get_texts())
