"""Benchmarks of the release pipeline and its models, run by hand (never from the test suite)."""
