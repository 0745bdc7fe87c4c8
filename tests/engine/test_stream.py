"""The stream mode: several frames answered together compute exactly what each computes alone."""

from __future__ import annotations

import pytest

from edgevl.engine.engine import Answered, Engine, Frame
from edgevl.engine.pipeline import Asked, answer_document
from edgevl.errors import EdgevlError
from edgevl.questions import Question
from edgevl.records import Job, Source, is_error
from tests.engine.test_exactness import _reference_tokens
from tests.harness.documents import pages, pdf_of, tiff_of
from tests.harness.images import noise_image

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "count": {"type": "integer"}},
          "required": ["ok", "count"]}
CAMERA = (
    Question(id="defect", ask="Is there a visible defect?", type="yes_no"),
    Question(id="connector", ask="Which connector?", type="choice", options=("type-A", "type-B", "none")),
    Question(id="label", ask="Read the label.", type="text", max_tokens=14),
    Question(id="count", ask="How many screws?", type="number", max_tokens=6),
)
SCAN = (
    Question(id="title", ask="Transcribe the title.", type="text", max_tokens=22),
    Question.model_validate({"id": "fields", "ask": "Extract the fields.", "type": "json", "max_tokens": 30,
                             "schema": SCHEMA}),
    Question(id="signed", ask="Is it signed?", type="yes_no"),
)
# Frames of different sizes, pixel budgets and rules: prefixes of different lengths side by side.
FRAMES = [
    Frame(noise_image(200, 120, seed=1), CAMERA, 64 * 64 * 4),
    Frame(noise_image(96, 300, seed=2), SCAN, 32 * 32 * 16),
    Frame(noise_image(320, 180, seed=3), CAMERA, 128 * 128),
    Frame(noise_image(150, 150, seed=4), SCAN, 64 * 64 * 4),
    Frame(noise_image(640, 360, seed=5), CAMERA, 64 * 64 * 4),
]


def _same(together: Answered, alone: Answered) -> None:
    assert together.tokens == alone.tokens
    assert together.image_tokens == alone.image_tokens
    for qid, scores in alone.scores.items():
        assert together.scores[qid] == pytest.approx(scores, abs=1e-4), qid
    for qid, answer in alone.answers.items():
        assert together.answers[qid].get("value") == answer.get("value"), qid
        assert together.answers[qid].get("probability") == pytest.approx(answer.get("probability"), abs=1e-4), qid


@pytest.mark.parametrize("max_batch", [8, 3])  # 3: the frames' rows queue for places in the decode batch
def test_frames_answered_together_are_token_identical_to_each_alone(fp32_model, max_batch) -> None:  # type: ignore[no-untyped-def]
    engine = Engine(fp32_model, max_batch=max_batch)
    together = engine.answer_frames(FRAMES)
    assert len(together) == len(FRAMES)
    generated = 0
    for frame, result in zip(FRAMES, together, strict=True):
        assert isinstance(result, Answered)
        _same(result, engine.answer(frame.image, frame.questions, frame.max_pixels))
        generated += sum(len(t) for t in result.tokens.values())
    # The decode really was shared: fewer passes than the frames' generated tokens.
    assert together[0].decode_steps < generated


def test_a_frame_in_a_stream_matches_generate_on_its_full_prompt(fp32_model) -> None:  # type: ignore[no-untyped-def]
    engine = Engine(fp32_model, max_batch=8)
    together = engine.answer_frames(FRAMES[:3])
    frame, result = FRAMES[1], together[1]
    assert isinstance(result, Answered)
    title = SCAN[0]
    assert result.tokens["title"] == _reference_tokens(fp32_model, title, frame.image, frame.max_pixels)


def test_a_frame_that_cannot_be_encoded_costs_only_itself(fp32_model) -> None:  # type: ignore[no-untyped-def]
    engine = Engine(fp32_model, max_batch=8)
    # A sliver the image processor refuses: its frame fails at encoding, before any shared pass.
    broken = Frame(noise_image(1, 400, seed=9), CAMERA, 64 * 64 * 4)
    results = engine.answer_frames([FRAMES[0], broken, FRAMES[2]])
    assert isinstance(results[1], EdgevlError)
    assert (results[1].code, "aspect ratio" in results[1].message) == ("engine_failed", True)
    for frame, result in ((FRAMES[0], results[0]), (FRAMES[2], results[2])):
        assert isinstance(result, Answered)
        _same(result, engine.answer(frame.image, frame.questions, frame.max_pixels))


def _document_pages(engine: Engine, data: bytes, together: int) -> list[dict[str, object]]:
    job = Job(rule="scan", source=Source(kind="cli", path="/scans/doc.pdf"), device_id="dev")
    record = answer_document(engine, job, data, Asked(SCAN, max_pixels=32 * 32 * 16, pages_together=together))
    assert not is_error(record), record
    return list(record["pages"])


def _same_pages(together: list[dict[str, object]], alone: list[dict[str, object]]) -> None:
    assert [p["page"] for p in together] == [p["page"] for p in alone]
    for mine, theirs in zip(together, alone, strict=True):
        assert ("error" in mine) == ("error" in theirs), mine["page"]
        if "error" in mine:
            assert mine["error"] == theirs["error"]
            continue
        for qid, answer in theirs["answers"].items():  # type: ignore[attr-defined]
            got = mine["answers"][qid]  # type: ignore[index]
            assert got.get("value") == answer.get("value"), (mine["page"], qid)
            assert got.get("probability") == pytest.approx(answer.get("probability"), abs=1e-4), (mine["page"], qid)


def test_a_documents_pages_answered_together_are_each_as_alone(fp32_model,  # type: ignore[no-untyped-def]
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine(fp32_model, max_batch=8)
    # Five scanned pages, the third a sliver the image processor refuses: it costs only its own page.
    data = tiff_of([*pages(2, seed=20), noise_image(1, 400, seed=9), *pages(2, seed=22)])
    alone = _document_pages(engine, data, 1)
    assert [p.get("error", {}).get("code") for p in alone] == [None, None, "engine_failed", None, None]  # type: ignore[attr-defined]
    sizes: list[int] = []
    answer_frames = engine.answer_frames

    def counted(frames: list[Frame], *args: object) -> list[Answered | EdgevlError]:
        sizes.append(len(frames))
        return answer_frames(frames, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(engine, "answer_frames", counted)
    _same_pages(_document_pages(engine, data, 3), alone)
    assert sizes == [3, 2]  # pages 1-3 shared their passes, then pages 4-5

    # Should the pages fail together (memory), each is answered alone: the same record.
    sizes.clear()

    def short_of_memory(frames: list[Frame], *args: object) -> list[Answered | EdgevlError]:
        sizes.append(len(frames))
        if len(frames) > 1:
            raise MemoryError
        return answer_frames(frames, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(engine, "answer_frames", short_of_memory)
    _same_pages(_document_pages(engine, data, 5), alone)
    assert sizes == [5, 1, 1, 1, 1, 1]


def test_a_page_that_cannot_be_rendered_costs_only_itself_in_a_stream(fp32_model) -> None:  # type: ignore[no-untyped-def]
    engine = Engine(fp32_model, max_batch=8)
    # A PDF page far too narrow to render, between two pages answered together.
    data = pdf_of([noise_image(200, 280, seed=30), noise_image(1, 400, seed=9), noise_image(200, 280, seed=31)])
    together = _document_pages(engine, data, 3)
    assert [p.get("error", {}).get("code") for p in together] == [None, "page_too_large", None]  # type: ignore[attr-defined]
    _same_pages(together, _document_pages(engine, data, 1))


@pytest.mark.parametrize("together", [1, 2])
def test_a_documents_size_is_its_first_answered_pages(fp32_model, together: int) -> None:  # type: ignore[no-untyped-def]
    engine = Engine(fp32_model, max_batch=8)
    data = tiff_of([noise_image(1, 400, seed=9), noise_image(180, 240, seed=40)])  # the first page fails
    job = Job(rule="scan", source=Source(kind="cli", path="/scans/doc.tif"), device_id="dev")
    record = answer_document(engine, job, data, Asked(SCAN, max_pixels=32 * 32 * 16, pages_together=together))
    assert not is_error(record)
    answered = record["pages"][1]
    assert "answers" in answered
    assert (record["image"]["width"], record["image"]["height"]) == (answered["image"]["width"],
                                                                     answered["image"]["height"])
