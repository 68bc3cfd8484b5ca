"""Grading on unseen cases, for instructors (README, "For instructors").

    GRADE_SEED=<int> pytest

draws the random inputs and weights of the core-versus-reference tests from that seed and adds three random
lengths (some odd, some past a chunk) to the ones written in the tests, so a student's core is checked on cases
the student has not seen. Without GRADE_SEED the tests are exactly as written (seed 0).
"""
import os
import random

import pytest

try:
    GRADE_SEED = int(os.environ.get("GRADE_SEED") or 0)
except ValueError:
    raise pytest.UsageError(f"GRADE_SEED must be an integer, not {os.environ['GRADE_SEED']!r}") from None


def lengths(written, most=150):
    """The sequence lengths a test was written with, plus three drawn from GRADE_SEED when it is set."""
    if not GRADE_SEED:
        return written
    return written + sorted(random.Random(GRADE_SEED).sample(range(1, most), 3))
