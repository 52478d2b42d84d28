"""Unit tests: no root, no libvirt. Hypothesis runs 250 examples per property by default; set
HYPOTHESIS_PROFILE=thorough for 5,000 (smoke: 10, for test_suite_layout's run without libvirt)."""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("default", max_examples=250, deadline=None)
settings.register_profile("thorough", max_examples=5000, deadline=None)
settings.register_profile("smoke", max_examples=10, deadline=None)  # the suite run again without libvirt
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
