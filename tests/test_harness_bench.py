"""harness/bench.py: --bench's cost against length and its training-step table."""
import json

import compare


def test_bench_records_cost_and_state_against_length(tmp_path):
    assert compare.main(["--bench", "--models", "attention,ssm,hrm", "--test-lengths", "16,48",
                         "--out", str(tmp_path)]) == 0
    rows = json.load(open(tmp_path / "bench.json"))["rows"]
    assert [(r["model"], r["length"]) for r in rows] == [(m, L) for m in ("attention", "ssm", "hrm") for L in (16, 48)]
    assert all({"train_ms", "infer_us_per_token"} <= set(r) for r in rows)     # every row measured both
    state = {(r["model"], r["length"]): r["state_floats"] for r in rows}
    assert state["attention", 48] == 3 * state["attention", 16]      # the KV cache grows with the sequence
    assert state["ssm", 48] == state["ssm", 16]                        # the recurrent state does not
    assert "| ssm | 48 |" in (tmp_path / "bench.md").read_text()
