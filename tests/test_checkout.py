"""The session check that tests leave no state in the checkout notices what it should."""

from __future__ import annotations

import pytest

from tests.support.checkout import STATE_NAMES, state_in

pytestmark = pytest.mark.unit


def test_state_at_the_top_and_in_a_top_level_folder_is_found(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / ".venv").mkdir()
    assert state_in(tmp_path) == set()
    (tmp_path / "mlruns" / "0").mkdir(parents=True)
    (tmp_path / "tests" / "mlflow.db").touch()
    (tmp_path / ".venv" / "mlruns").mkdir()  # a hidden folder (a venv): not searched
    assert state_in(tmp_path) == {tmp_path / "mlruns", tmp_path / "tests" / "mlflow.db"}
    for name in STATE_NAMES:
        (tmp_path / name).mkdir(exist_ok=True)
    assert {p.name for p in state_in(tmp_path) if p.parent == tmp_path} == set(STATE_NAMES)
