"""The pytest plugin of imago (entry point ``pytest11``).

Registers :mod:`imago.testing` for assertion rewriting, so conformance failures show the
compared values.
"""

from __future__ import annotations

import pytest

pytest.register_assert_rewrite("imago.testing")
