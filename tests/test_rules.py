"""The rules file: valid files load, every invalid key is named with its file and path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgevl.errors import ConfigError
from edgevl.rules import load_rules

GOOD = """
[[rule]]
name = "weld-seam"
folders = ["/srv/inbox/station-3"]
patterns = ["*.jpg", "*.png"]
crop = [100, 50, 800, 600]
max_pixels = 100000
  [[rule.question]]
  id = "defect"
  ask = "Is there a visible defect on the weld seam?"
  type = "yes_no"
  alarm_above = 0.5
  [[rule.question]]
  id = "label"
  ask = "Read the text on the part label."
  max_tokens = 32
"""


def test_good_rules_load(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(GOOD)
    rules = load_rules(path)
    rule = rules.get("weld-seam")
    assert rule.crop == (100, 50, 800, 600)
    assert [q.id for q in rule.questions] == ["defect", "label"]
    assert rule.questions[1].type == "text"
    assert rule.questions[1].token_budget == 32
    with pytest.raises(ConfigError, match="no rule named 'x'"):
        rules.get("x")


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda s: s.replace('type = "yes_no"', 'type = "maybe"'),
     'rule "weld-seam", question "defect", type: must be one of'),
    (lambda s: s.replace("max_pixels = 100000", "max_pixels = 100000\nbogus = 1"),
     'rule "weld-seam": unknown key "bogus"'),
    (lambda s: s.replace('alarm_above = 0.5', 'alarm_abvoe = 0.5'),
     'rule "weld-seam", question "defect": unknown key "alarm_abvoe" — did you mean "alarm_above"?'),
    (lambda s: s.replace('folders = ["/srv/inbox/station-3"]', 'folders = "/srv/inbox/station-3"'),
     'rule "weld-seam", folders: must be a list of folder paths'),
    (lambda s: s.replace('id = "label"', 'id = "defect"'), "duplicate question ids: defect"),
    (lambda s: s.replace("alarm_above = 0.5", "alarm_above = 2"),
     'rule "weld-seam", question "defect", alarm_above: must be at most 1'),
    (lambda s: s.replace('name = "weld-seam"', 'name = "../etc"'), 'rule "../etc", name: has characters that are not'),
    (lambda s: s + "[[rule]]\nname = 'x'\n", 'rule "x": "question" is missing'),
    (lambda s: s.replace("[[rule.question]]", "[[rule.question]", 1), "not valid TOML"),
])
def test_errors_name_file_and_key(tmp_path: Path, edit, expected: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "rules.toml"
    path.write_text(edit(GOOD))
    with pytest.raises(ConfigError) as err:
        load_rules(path)
    assert str(path) in err.value.message
    assert expected in err.value.message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the rules file"):
        load_rules(tmp_path / "absent.toml")


def test_one_mistake_is_one_message(tmp_path: Path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(GOOD.replace("alarm_above = 0.5", "alarm_abvoe = 0.5"))
    with pytest.raises(ConfigError) as err:
        load_rules(path)
    assert len(err.value.message.splitlines()) == 1, err.value.message
    line = next(i for i, text in enumerate(GOOD.replace("alarm_above", "alarm_abvoe").splitlines(), 1)
                if "alarm_abvoe" in text)
    assert err.value.message.startswith(f"{path}:{line}: ")


SCHEMA_RULES = """
[[rule]]
name = "scans"
folders = ["/tmp"]
  [[rule.question]]
  id = "fields"
  ask = "Extract the invoice."
  type = "json"
  schema_file = "schemas/invoice.json"
  [[rule.question]]
  id = "inline"
  ask = "List the defects."
  type = "json"
  [rule.question.schema]
  type = "array"
  maxItems = 3
  items = { type = "string", enum = ["dent", "scratch"] }
"""


def test_a_schema_is_given_inline_or_in_a_file_beside_the_rules(tmp_path: Path) -> None:
    (tmp_path / "schemas").mkdir()
    invoice = {"type": "object", "properties": {"number": {"type": "string"}, "total": {"type": "number"}},
               "required": ["number"]}
    (tmp_path / "schemas" / "invoice.json").write_text(json.dumps(invoice))
    path = tmp_path / "rules.toml"
    path.write_text(SCHEMA_RULES)
    fields, inline = load_rules(path).rules[0].questions
    assert fields.json_schema == invoice
    assert fields.schema_file == tmp_path / "schemas" / "invoice.json"
    assert inline.json_schema == {"type": "array", "maxItems": 3,
                                  "items": {"type": "string", "enum": ["dent", "scratch"]}}
    assert fields.grammar
    assert inline.grammar


@pytest.mark.parametrize(("schema_file", "expected"), [
    (None, 'rule "scans", question "fields": cannot read schema_file'),
    ("{not json", 'rule "scans", question "fields": schema_file'),
    ("[" * 100_000, 'rule "scans", question "fields": schema_file'),  # deeper than the parser goes
    ('{"type": "string", "minLength": 9, "maxLength": 1}',
     'rule "scans", question "fields": the schema cannot be compiled'),
    ('{"type": "object", "oneOf": []}', 'question "fields": schema: oneOf not supported for type object'),
])
def test_check_names_the_rule_and_question_of_a_schema_it_cannot_use(tmp_path: Path, schema_file: str | None,
                                                                     expected: str) -> None:
    if schema_file is not None:
        (tmp_path / "schemas").mkdir()
        (tmp_path / "schemas" / "invoice.json").write_text(schema_file)
    path = tmp_path / "rules.toml"
    path.write_text(SCHEMA_RULES)
    with pytest.raises(ConfigError) as err:
        load_rules(path)
    assert expected in err.value.message, err.value.message
