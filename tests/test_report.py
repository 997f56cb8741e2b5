"""The bench's verdicts: a missed target is called out of reach only when a measured bound
makes it so."""

from __future__ import annotations

from benchmarks.report import _bounded_verdict, _first_label_verdict

STARTUP = {"python": 0.03, "naive_imports": 0.19, "settings_library": 0.23}  # +200 ms


def test_a_ratio_under_its_target_is_out_of_reach_only_below_the_ceiling() -> None:
    assert _bounded_verdict(1.4, 1.3, 1.2) == "met"
    assert _bounded_verdict(0.8, 1.3, 0.9) == "out of reach (ceiling 0.90)"
    assert _bounded_verdict(0.8, 1.3, 1.6) == "MISSED"


def test_first_label_is_out_of_reach_when_the_settings_import_alone_exceeds_the_target() -> None:
    # Naive loop 0.2 s: 0.2 + 0.2 s of import is 2.0 times, whatever the daemon does.
    verdict = _first_label_verdict([("a", 0.2, 0.5), ("b", 0.3, 0.35)], STARTUP)
    assert verdict == "out of reach (importing pydantic-settings alone takes 200 ms: at best 2.00)"


def test_first_label_is_missed_when_the_import_leaves_room() -> None:
    # Naive loop 1.0 s: the import allows 1.2 times, so 2.0 times is the daemon's own fault.
    assert _first_label_verdict([("a", 1.0, 2.0)], STARTUP) == "MISSED"
    assert _first_label_verdict([("a", 0.2, 0.5)], None) == "MISSED"
    assert _first_label_verdict([("a", 0.2, 0.29)], STARTUP) == "met"
