"""harness/bench.py: --bench's cost against length."""
import json

import compare
from harness import bench


def test_bench_records_cost_and_state_against_length(tmp_path):
    assert compare.main(["--bench", "--models", "attention,ssm,hrm", "--test-lengths", "16,48",
                         "--out", str(tmp_path)]) == 0
    rows = json.load(open(tmp_path / "bench.json"))["rows"]
    md = (tmp_path / "bench.md").read_text()
    assert json.load(open(tmp_path / "bench.json"))["finished"] and "Not finished" not in md
    assert [(r["model"], r["length"]) for r in rows] == [(m, L) for m in ("attention", "ssm", "hrm") for L in (16, 48)]
    assert all({"train_ms", "infer_us_per_token"} <= set(r) for r in rows)     # every row measured both
    state = {(r["model"], r["length"]): r["state_floats"] for r in rows}
    assert state["attention", 48] == 3 * state["attention", 16]      # the KV cache grows with the sequence
    assert state["ssm", 48] == state["ssm", 16]                        # the recurrent state does not
    assert "| ssm | 48 |" in (tmp_path / "bench.md").read_text()


def test_a_stopped_bench_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    """Stopped (Ctrl-C; any other stop leaves the files of the last row measured): the rows measured before are
    saved and the report says that it did not finish; exit 130."""
    real, calls = bench.bench_row, []

    def stop(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:   # stopped at its second row
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(bench, "bench_row", stop)
    assert compare.main(["--bench", "--models", "ssm", "--test-lengths", "16,24", "--out", str(tmp_path)]) == 130
    saved = json.load(open(tmp_path / "bench.json"))
    assert not saved["finished"] and [r["length"] for r in saved["rows"]] == [16]
    md = (tmp_path / "bench.md").read_text()
    assert "| ssm | 16 |" in md and "Not finished" in md
