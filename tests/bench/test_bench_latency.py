"""`ditserve bench latency` in its --quick tiny mode: exact and async on the same stage
processes beside the monolith, and the quality table on the demo model. Not timing
assertions: only that the harness measures what it says."""

from __future__ import annotations

import json

from ditserve.cli import main


def test_latency_compares_exact_and_async_on_the_same_stages(tmp_path):
    assert main(["bench", "latency", "--quick", "--out-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "latency.json").read_text())
    rows = data["summary"]
    assert [r["variant"] for r in rows] == ["monolith", "2 stages, exact", "2 stages, async"]
    assert rows[2]["vs_exact"] > 0 and rows[2]["goal"] == "≤ 0.65"
    assert "Load average" in (tmp_path / "latency.md").read_text()


def test_quality_table_covers_each_warmup_against_exact(tmp_path):
    assert main(["bench", "latency", "--quick", "--set", "quality=true",
                 "--set", "quality_x0_trends=0,0.5", "--out-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "latency-quality.json").read_text())["summary"]
    assert [r["variant"] for r in rows] == [
        "exact, 2 stages", "async, 2 stages, W = 0, x0 trend 0",
        "async, 2 stages, W = 2, x0 trend 0", "async, 2 stages, W = 0, x0 trend 0.5",
        "async, 2 stages, W = 2, x0 trend 0.5"]
    assert all(r["colour"].endswith("%") and r["shape"].endswith("%") for r in rows)
    # ddim 6 with W = 2 of 6 steps exact: stale, so not exact, but not far off either.
    assert 0 < rows[2]["rms_rel"] < rows[1]["rms_rel"]
    assert rows[3]["rms_rel"] != rows[1]["rms_rel"]  # the trend is applied
