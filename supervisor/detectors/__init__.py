"""Detectors: observations in, verdicts out.

Each detector is a small stateful object fed one observation at a time with the time it was
taken; it never reads a clock itself, so tests drive it with plain numbers. The building
blocks in ``signals`` (sustained-for, hysteresis, rate over a window) are shared by every
threshold so the semantics of ``for:`` and "clears when" are the same everywhere.
"""
