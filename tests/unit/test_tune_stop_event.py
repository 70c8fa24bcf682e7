"""tune_stop_event reads a private Ray attribute: outside a trial it is quietly None; when Ray moves
it, codiemb says so once instead of going quiet. (The real path, a trial Tune stops, runs in
tests/integration/test_private_apis.py.)"""

from __future__ import annotations

import logging
import sys

from codiemb.tune import common


def test_outside_a_trial_none_and_no_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="codiemb.tune.common"):
        assert common.tune_stop_event() is None
    assert not caplog.records


def test_warns_once_when_the_private_module_is_gone(monkeypatch, caplog):
    monkeypatch.setattr(common, "_warned_private", set())
    monkeypatch.setitem(sys.modules, "ray.train._internal.session", None)  # import now raises ImportError
    with caplog.at_level(logging.WARNING, logger="codiemb.tune.common"):
        assert common.tune_stop_event() is None
        assert common.tune_stop_event() is None
    (rec,) = caplog.records
    assert "cannot tell when Tune stops a trial" in rec.getMessage() and "FAILED" in rec.getMessage()


def test_warns_when_the_session_has_no_stop_event(monkeypatch, caplog):
    import ray.train._internal.session as session

    monkeypatch.setattr(common, "_warned_private", set())
    monkeypatch.setattr(session, "get_session", lambda: object())
    with caplog.at_level(logging.WARNING, logger="codiemb.tune.common"):
        assert common.tune_stop_event() is None
    assert "no stop_event" in caplog.records[0].getMessage()
