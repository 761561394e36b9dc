"""Test kit shared by the test modules: helpers, fixtures' building blocks, models-from-code files."""
