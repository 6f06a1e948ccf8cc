"""Hypothesis profiles for the fuzz suite: ``ci`` (the default: few examples, the whole folder in well under
three minutes on two CPU cores) and ``thorough`` (local runs: ``EFFICIENT_OPS_FUZZ=thorough pytest tests/fuzz``)."""

import os

from hypothesis import HealthCheck, Phase, settings

# No deadline: the Triton interpreter's first call of a kernel compiles it, which takes seconds on a busy machine.
_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
           "print_blob": True}
# ci: no shrinking either, so a failure is reported in seconds (rerun with "thorough" for a minimal example)
settings.register_profile("ci", max_examples=10, derandomize=True, database=None,
                          phases=[Phase.explicit, Phase.generate], **_COMMON)
settings.register_profile("thorough", max_examples=300, **_COMMON)
PROFILE = os.environ.get("EFFICIENT_OPS_FUZZ", "ci")
settings.load_profile(PROFILE)
