"""Every targeted bad or edge-case input of :mod:`cases` gets a clear error naming the argument, or the right answer."""

import pytest

from .cases import CASES, classify


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", CASES, ids=[f"{c.family}: {c.name}" for c in CASES])
def test_case(case):
    outcome, detail = classify(case)
    assert outcome in ("clear", "right"), f"{outcome}: {detail}"
