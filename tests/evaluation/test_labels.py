"""Labels as spreadsheets export them, and one clear error per row at fault."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgevl.errors import ConfigError
from edgevl.evaluation.labels import LabelledSet, LabelsError, load_labels
from edgevl.questions import Question

QUESTIONS = (
    Question(id="defect", ask="Defect?", type="yes_no"),
    Question(id="kind", ask="Which?", type="choice", options=("type-A", "type-B")),
    Question(id="count", ask="How many?", type="number"),
    Question(id="label", ask="Read it.", type="text"),
    Question(id="fields", ask="Fields?", type="json"),
)


def _folder(tmp_path: Path, *names: str) -> Path:
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"image bytes are not read here")
    return tmp_path


def test_csv_from_a_spreadsheet(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "a.jpg", "b.jpg", "sub/c.jpg")
    # A byte-order mark and semicolons, as a spreadsheet in many locales saves it.
    (folder / "labels.csv").write_text(
        "\ufefffile;defect;kind;count;label;fields\n"
        "a.jpg;Yes;TYPE-a;3;  AB-12 ;\"{\"\"id\"\": 1}\"\n"
        "b.jpg;0;;2.5;;\n"
        "\n"
        "sub/c.jpg;true;type-B;;;\n", encoding="utf-8")
    labelled = load_labels(folder, QUESTIONS)
    assert [i.file for i in labelled.images] == ["a.jpg", "b.jpg", "sub/c.jpg"]
    a, b, c = (i.labels for i in labelled.images)
    assert a == {"defect": True, "kind": "type-A", "count": 3.0, "label": "AB-12", "fields": {"id": 1}}
    assert b == {"defect": False, "count": 2.5}, "an empty cell is not labelled"
    assert c == {"defect": True, "kind": "type-B"}
    assert labelled.labelled("kind") == 2
    assert [i.row for i in labelled.images] == [2, 3, 5]


def test_json_lines(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "a.jpg", "b.jpg")
    (folder / "labels.jsonl").write_text(
        '{"file": "a.jpg", "defect": false, "count": 4, "fields": {"id": "x", "n": [1, 2]}}\n'
        '{"file": "b.jpg", "defect": "yes", "kind": null}\n')
    a, b = (i.labels for i in load_labels(folder, QUESTIONS).images)
    assert a == {"defect": False, "count": 4.0, "fields": {"id": "x", "n": [1, 2]}}
    assert b == {"defect": True}


def test_every_row_at_fault_is_named_with_its_number(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "a.jpg", "b.jpg")
    (tmp_path.parent / "outside.jpg").write_bytes(b"x")
    (folder / "labels.csv").write_text(
        "file,defect,kind,count,fields,colour\n"
        "a.jpg,maybe,type-C,many,{oops,\n"
        "missing.jpg,yes,,,,\n"
        "../outside.jpg,no,,,,\n"
        "/etc/passwd,no,,,,\n"
        "b.jpg,no,,,,\n"
        "b.jpg,yes,,,,\n"
        "a.jpg,yes,,,,,extra\n")
    with pytest.raises(LabelsError) as caught:
        load_labels(folder, QUESTIONS)
    problems = caught.value.problems
    assert problems[0] == (
        "1: unknown question id 'colour' (the rule's questions: defect, kind, count, label, fields)")
    by_row = {p.split(":", 1)[0]: p for p in problems[1:]}
    assert set(by_row) == {"2", "3", "4", "5", "7", "8"}
    assert "defect: 'maybe' is not yes or no" in by_row["2"]
    assert "kind: 'type-C' is not one of the options: type-A, type-B" in by_row["2"]
    assert "count: 'many' is not a number" in by_row["2"]
    assert "fields: not valid JSON" in by_row["2"]
    assert "'missing.jpg': no such image" in by_row["3"]
    assert "lies outside the labelled folder" in by_row["4"]
    assert "must be relative" in by_row["5"]
    assert "labelled again (first in row 6)" in by_row["7"]
    assert "7 cells, but the header has 6 columns" in by_row["8"]
    assert str(folder / "labels.csv") + ":3:" in caught.value.message


def test_json_lines_errors_have_line_numbers(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "a.jpg")
    (folder / "labels.jsonl").write_text('{"file": "a.jpg", "defect": 2}\nnot json\n[1]\n{"file": "a.jpg", "x": 1}\n')
    with pytest.raises(LabelsError) as caught:
        load_labels(folder, QUESTIONS)
    assert [p.split(":", 1)[0] for p in caught.value.problems] == ["1", "2", "3", "4"]
    assert "unknown question id 'x'" in caught.value.problems[3]


def test_no_labels_or_both_kinds(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no labels\.csv or labels\.jsonl"):
        load_labels(tmp_path, QUESTIONS)
    (tmp_path / "labels.csv").write_text("file,defect\n")
    with pytest.raises(ConfigError, match="no labelled images"):
        load_labels(tmp_path, QUESTIONS)
    (tmp_path / "labels.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"both labels\.csv and labels\.jsonl"):
        load_labels(tmp_path, QUESTIONS)


def _outcome(folder: Path) -> LabelledSet | ConfigError:
    """The labelled set, or the one kind of error a labels file may give."""
    try:
        return load_labels(folder, QUESTIONS)
    except ConfigError as exc:
        return exc


_cells = st.one_of(st.text(max_size=30), st.sampled_from(["a.jpg", "yes", "no", "type-A", "3.5", "{}", "../x", "/"]),
                   st.text(alphabet="a/.\x00", min_size=250, max_size=300),
                   st.text(alphabet="ab", min_size=256, max_size=300))  # a name longer than a file name may be


@given(st.lists(st.lists(_cells, max_size=7), max_size=6), st.sampled_from([",", ";", "\t"]))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
def test_any_csv_is_a_labelled_set_or_a_labels_error(tmp_path: Path, rows: list[list[str]], sep: str) -> None:
    folder = _folder(tmp_path, "a.jpg")
    (folder / "labels.csv").write_text(
        "\n".join(sep.join(['"' + c.replace('"', '""') + '"' for c in row]) for row in
                  [["file", "defect", "kind", "count", "label", "fields"], *rows]), encoding="utf-8")
    outcome = _outcome(folder)
    if isinstance(outcome, ConfigError):
        assert outcome.message
    else:
        assert all(image.path.is_file() for image in outcome.images)


@given(st.lists(st.one_of(st.text(max_size=40), st.dictionaries(
    st.sampled_from(["file", "defect", "kind", "count", "fields", "x"]),
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10),
              st.lists(st.integers(), max_size=2)), max_size=5).map(json.dumps)), max_size=6))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
def test_any_json_lines_are_a_labelled_set_or_a_labels_error(tmp_path: Path, lines: list[str]) -> None:
    folder = _folder(tmp_path, "a.jpg")
    (folder / "labels.jsonl").write_text("\n".join(lines), encoding="utf-8")
    outcome = _outcome(folder)
    assert isinstance(outcome, LabelledSet) or outcome.message
