"""Shared fixtures: the reference-oracle pipeline and inversions (tests/oracle_fixtures.py)."""

from tests.oracle_fixtures import *  # noqa: F401,F403
