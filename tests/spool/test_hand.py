"""The in-hand ledger: what a daemon death interrupted, counted over consecutive deaths."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgevl.spool.hand import Hand


def _die_holding(path: Path, key: str) -> None:
    """A daemon run that dies (nothing releases) while ``key`` is in hand."""
    hand = Hand(path)
    hand.holding(key).__enter__()


def test_an_input_in_hand_at_two_consecutive_deaths_is_poison(tmp_path: Path) -> None:
    path = tmp_path / "in-hand.json"
    _die_holding(path, "file:/in/a.png")
    first = Hand(path)
    assert first.carried == {"file:/in/a.png": 1}
    assert first.poisoned() == []
    first.holding("file:/in/a.png").__enter__()  # the restart meets it again, and dies again
    second = Hand(path)
    assert second.poisoned() == [("file:/in/a.png", 2)]


def test_deaths_count_only_when_consecutive(tmp_path: Path) -> None:
    path = tmp_path / "in-hand.json"
    _die_holding(path, "job:a")
    hand = Hand(path)
    with hand.holding("job:a"):
        pass  # this time it went through
    hand.holding("job:b").__enter__()  # and the next death had something else in hand
    after = Hand(path)
    assert after.carried == {"job:b": 1}


def test_a_start_that_dies_before_holding_anything_counts_no_death(tmp_path: Path) -> None:
    path = tmp_path / "in-hand.json"
    _die_holding(path, "job:a")
    for _ in range(3):
        assert Hand(path).carried == {"job:a": 1}  # e.g. the model failed to load, again and again


def test_an_exception_leaving_the_block_leaves_the_input_in_hand(tmp_path: Path) -> None:
    path = tmp_path / "in-hand.json"
    hand = Hand(path)
    with pytest.raises(RuntimeError), hand.holding("job:x"):
        raise RuntimeError("the daemon goes down")
    assert Hand(path).carried == {"job:x": 1}
    hand.release("job:x")
    assert Hand(path).carried == {}


def test_nested_holds_of_one_key_and_poison_marks_survive_restarts(tmp_path: Path) -> None:
    path = tmp_path / "in-hand.json"
    hand = Hand(path)
    with hand.holding("job:x"):
        with hand.holding("job:x"):
            pass
        assert Hand(path).carried == {"job:x": 1}, "still in hand after the inner step"
    hand.mark_poison("mqtt:abc")
    again = Hand(path)
    assert again.take_poison("mqtt:abc")
    assert not again.take_poison("mqtt:abc")
    assert not Hand(path).take_poison("mqtt:abc")


def test_an_unreadable_ledger_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "in-hand.json"
    path.write_text("{torn")
    assert Hand(path).carried == {}


def test_storage_and_input_errors_release_the_input(tmp_path: Path) -> None:
    from edgevl.errors import InputError

    path = tmp_path / "in-hand.json"
    hand = Hand(path)
    for error in (OSError(28, "No space left on device"), InputError("too big", "file_too_large")):
        with pytest.raises(type(error)), hand.holding("job:x"):
            raise error
        assert Hand(path).carried == {}, "callers handle these: no death to count"


def test_inputs_handed_over_together_are_noted_and_released_together(tmp_path: Path) -> None:
    path = tmp_path / "in-hand.json"
    hand = Hand(path)
    with hand.holding("job:x"):
        with hand.holding("job:a", "job:x", "job:b"):
            assert set(Hand(path).carried) == {"job:a", "job:b", "job:x"}
        assert Hand(path).carried == {"job:x": 1}, "a key also held outside stays in hand"
    hand = Hand(path)
    assert hand.carried == {}
    hand.holding("job:a", "job:b").__enter__()  # a death with a batch in hand counts for each of them
    assert Hand(path).carried == {"job:a": 1, "job:b": 1}
