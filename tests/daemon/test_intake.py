"""The intake's batches, with a real spool, hand and folder watcher: as many frames as the worker's memory was
fitted to, a rule's larger pictures counting as several."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgevl.config import load_config
from edgevl.daemon.delivery import Delivery
from edgevl.daemon.intake import Intake
from edgevl.folders.watcher import FolderWatcher
from edgevl.rules import Rule
from edgevl.spool.claim import claim
from edgevl.spool.hand import Hand
from edgevl.spool.store import Spool

MODEL_PIXELS = 40_000


def _rule(name: str, max_pixels: int | None) -> Rule:
    return Rule.model_validate({"name": name, "max_pixels": max_pixels, "question": [{"id": "q", "ask": "?"}]})


RULES = {"cam": _rule("cam", None), "page": _rule("page", 100_000), "poster": _rule("poster", 400_000)}


@pytest.fixture
def intake(tmp_path: Path) -> Intake:
    return _intake(tmp_path)


def _intake(tmp_path: Path) -> Intake:
    config_path = tmp_path / "edgevl.toml"
    config_path.write_text(f'state_dir = "{tmp_path}/state"\n[model]\nmax_pixels = {MODEL_PIXELS}\n')
    config = load_config(config_path)
    hand = Hand(tmp_path / "in-hand.json")
    spool = Spool(tmp_path / "spool", hand)
    delivery = Delivery(spool, config.folders, "dev", hand, lambda record: None)
    watcher = FolderWatcher((), settle_ms=0, poll_interval=0, rescan_interval=60)
    return Intake(config, spool, hand, watcher, delivery, RULES.get)


def _spool(intake: Intake, inbox: Path, jobs: list[tuple[str, str]]) -> dict[str, str]:
    """Claims the files in order; returns each one's spool key by name."""
    inbox.mkdir(exist_ok=True)
    keys = {}
    for name, rule in jobs:
        (inbox / name).write_bytes(b"\xff\xd8\xff image")
        job = claim(intake.spool, inbox / name, rule, "t", 1 << 20)
        assert job is not None
        keys[job.key] = name
    return keys


def test_larger_pictures_count_as_several_frames(intake: Intake, tmp_path: Path) -> None:
    assert [intake.frames_of(RULES[r]) for r in ("cam", "page", "poster")] == [1, 3, 10]
    names = _spool(intake, tmp_path / "inbox", [("a.jpg", "cam"), ("p1.jpg", "page"), ("p2.jpg", "page"),
                                                ("b.jpg", "cam"), ("c.jpg", "cam")])
    works = intake.batch(4)
    assert works is not None
    # a (1) and the first page (3) fill the four frames; the second page waits to lead the next batch.
    assert [names[w.key] for w in works] == ["a.jpg", "p1.jpg"]
    works = intake.batch(5)
    assert works is not None
    assert [names[w.key] for w in works] == ["a.jpg", "p1.jpg", "b.jpg"]  # p2 would make 7: it waits


def test_a_picture_larger_than_a_whole_batch_still_goes_alone_first(intake: Intake, tmp_path: Path) -> None:
    names = _spool(intake, tmp_path / "inbox", [("big.jpg", "poster"), ("a.jpg", "cam")])
    works = intake.batch(4)
    assert works is not None
    assert [names[w.key] for w in works] == ["big.jpg"]
    assert intake.frames_of(None) == 1  # a job whose rule is gone gets its error record, not a batch's room


@pytest.mark.parametrize("died_on", ["a.jpg", "b.jpg"])
def test_a_job_the_worker_died_on_goes_alone(intake: Intake, tmp_path: Path, died_on: str) -> None:
    # A poison input the weights could not foresee costs the jobs that came with it one try, never two.
    names = _spool(intake, tmp_path / "inbox", [("a.jpg", "cam"), ("b.jpg", "cam"), ("c.jpg", "cam")])
    (job,) = [job for job in intake.spool.pending() if names[job.key] == died_on]
    job.add_worker_failure("worker_crashed")
    works = intake.batch(4)
    assert works is not None
    # First, it goes alone; later, it waits for a batch of its own.
    assert [names[w.key] for w in works] == (["a.jpg"] if died_on == "a.jpg" else ["a.jpg", "c.jpg"])


@settings(max_examples=40, deadline=None)
@given(jobs=st.lists(st.tuples(st.sampled_from(sorted(RULES)), st.booleans()), min_size=1, max_size=8),
       most=st.integers(1, 12))
def test_any_waiting_jobs_make_a_batch_within_the_frames(jobs: list[tuple[str, bool]], most: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        intake = _intake(Path(tmp))
        names = _spool(intake, Path(tmp) / "inbox", [(f"{i}.jpg", rule) for i, (rule, _) in enumerate(jobs)])
        died = {f"{i}.jpg" for i, (_, dead) in enumerate(jobs) if dead}
        for job in intake.spool.pending():
            if names[job.key] in died:
                job.add_worker_failure("worker_crashed")
        works = intake.batch(most)
        assert works, "waiting jobs always make a batch"
        taken = [names[w.key] for w in works]
        assert taken[0] == "0.jpg"  # the oldest always goes
        assert taken == sorted(taken, key=lambda name: int(name.split(".")[0]))  # oldest first
        weights = [intake.frames_of(w.rule) for w in works]
        assert len(works) == 1 or sum(weights) <= most
        assert len(works) == 1 or not died & set(taken)  # a job the worker died on goes alone
