"""bench.py's speed targets: each row with one says whether it is met, and by how much it is missed."""
from bench import target_note


def test_a_target_met_and_missed_by_how_much():
    row = {"stage": "prior", "what": "train step, bench-toy batch 32", "ms": 90.0}
    assert target_note(row) == "target ≤ 60 ms: missed, 90.0 (1.50× the limit)" and row["target_met"] is False
    row = {"stage": "dalle", "what": "sample bench-long, recompute, batch 1", "ms": 80.0, "speedup": 12.0}
    assert target_note(row) == "target ≥ 10× KV-cache speed-up: met" and row["target_met"] is True
    row = {"stage": "dalle", "what": "train step, bench-long batch 4", "ms": 800.0, "mfu": 0.8}
    assert target_note(row) == "target ≥ 85% of the matmul peak: missed, 80% (0.94× the limit)"


def test_rows_without_a_target_get_no_note():
    row = {"stage": "dalle", "what": "train step, bench-toy batch 16", "ms": 120.0}
    assert target_note(row) is None and "target_met" not in row
