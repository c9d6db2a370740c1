"""Smoke test of `ditserve bench gateway --quick`: it starts `ditserve up` and a gateway,
sends the same request each way and reports a row per way in. Figures are not checked."""

from __future__ import annotations

import json

from ditserve.cli import main


def test_bench_gateway_measures_each_way_in(tmp_path):
    assert main(["bench", "gateway", "--quick", "--out-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gateway.json").read_text())
    variants = [row["variant"] for row in data["summary"]]
    assert variants == ["gRPC", "HTTP/JSON", "HTTP/SSE", "gRPC + approximate previews",
                        "HTTP/SSE + approximate previews"]
    assert all(len(data["samples"][v]) == 3 for v in variants)  # --quick: 3 rounds each
    assert all(0 < first <= total for v in variants for first, total in data["samples"][v])
    assert "| HTTP/SSE |" in (tmp_path / "gateway.md").read_text()
