"""Pure rules: the CXR filter, UID validation, instance-set hash."""

from __future__ import annotations

import pytest

from cxr_daemon.domain import (
    FilterRule,
    chest_xray_series,
    instance_set_hash,
    skip_reason,
    validate_uid,
)
from cxr_daemon.errors import InvalidUidError
from tests.fakes import make_study

RULE = FilterRule(modalities=("CR", "DX"), body_parts=("CHEST",))


@pytest.mark.parametrize(
    ("modality", "part", "accepted"),
    [
        ("DX", "CHEST", True),
        ("CR", "CHEST", True),
        ("cr", "chest", True),
        ("DX", "", True),
        ("DX", "  ", True),
        ("DX", "ABDOMEN", False),
        ("CR", "EXTREMITY", False),
        ("CT", "CHEST", False),
        ("SR", "", False),
    ],
)
def test_filter_decision(modality: str, part: str, accepted: bool) -> None:
    """CR/DX of the chest (or with no body part recorded) pass; everything else is skipped."""
    study = make_study(1, modality=modality, body_part=part)
    assert (skip_reason(study, RULE) is None) is accepted


def test_empty_body_parts_accepts_any_part() -> None:
    """body_parts = [] accepts any BodyPartExamined."""
    study = make_study(1, modality="DX", body_part="ABDOMEN")
    assert skip_reason(study, FilterRule(modalities=("DX",), body_parts=())) is None


def test_skip_reason_names_what_was_found() -> None:
    """The reason says which modalities/body parts the study had."""
    reason = skip_reason(make_study(1, modality="CT", body_part="HEAD"), RULE)
    assert reason is not None
    assert "CT/HEAD" in reason
    assert "CR/DX" in reason


def test_only_chest_series_are_selected_from_a_mixed_study() -> None:
    """A DX study with a dose SR series keeps only the DX series."""
    study = make_study(1, extra_series=(("SR", ""),))
    assert [s.modality for s in chest_xray_series(study, RULE)] == ["DX"]


@pytest.mark.parametrize("uid", ["1.2.3", "1", "1.2.840.10008.5.1.4.1.1.1"])
def test_valid_uids_pass(uid: str) -> None:
    """Digits-and-dots UIDs up to 64 characters are accepted."""
    assert validate_uid(uid) == uid


@pytest.mark.parametrize(
    "uid", ["", "1..2", "1.2.", "../etc/passwd", "1.2/3", "1.2.3 ", "1." + "2" * 63, "a.b"]
)
def test_invalid_uids_are_rejected(uid: str) -> None:
    """Path characters, empty parts and over-long UIDs are rejected."""
    with pytest.raises(InvalidUidError):
        validate_uid(uid)


def test_instance_set_hash_ignores_order() -> None:
    """The hash depends on the set, not on the order Orthanc lists instances in."""
    assert instance_set_hash(["1.2", "1.3"]) == instance_set_hash(["1.3", "1.2"])
    assert instance_set_hash(["1.2"]) != instance_set_hash(["1.2", "1.3"])


def test_reconnect_delay_doubles_and_is_capped() -> None:
    """Back-off after failures in a row doubles from the poll interval and stops at 30 s."""
    from cxr_daemon.domain import reconnect_delay  # noqa: PLC0415

    assert [reconnect_delay(1.0, n) for n in (1, 2, 3)] == [2.0, 4.0, 8.0]
    assert reconnect_delay(2.0, 50) == 30.0
    assert reconnect_delay(0.0, 1) > 0
