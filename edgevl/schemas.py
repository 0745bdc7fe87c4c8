"""The JSON Schema subset a ``json`` question's answer can be constrained to, and its grammar.

The subset is what a document's fields need and what a grammar can enforce
token by token: object (properties, required, additionalProperties), array
(items, minItems, maxItems), string (minLength, maxLength, enum), number and
integer (minimum, maximum, enum), boolean and null.  A keyword outside it is
refused by name rather than silently ignored, so that an answer never claims
to follow a schema it was not held to.  The grammar is compiled by llguidance
when the rules are loaded (``check``, ``run``, a reload), so a schema it cannot
compile is a configuration error naming its rule and question.
"""

from __future__ import annotations

import functools
import json
from typing import Any

KEYWORDS: dict[str, frozenset[str]] = {
    "object": frozenset({"properties", "required", "additionalProperties"}),
    "array": frozenset({"items", "minItems", "maxItems"}),
    "string": frozenset({"minLength", "maxLength", "enum"}),
    "number": frozenset({"minimum", "maximum", "enum"}),
    "integer": frozenset({"minimum", "maximum", "enum"}),
    "boolean": frozenset(),
    "null": frozenset(),
}
ANNOTATIONS = frozenset({"type", "description", "title"})
MAX_DEPTH = 16
MAX_NODES = 1000
# A number question's answer: a JSON number, nothing around it.
NUMBER_SCHEMA: dict[str, Any] = {"type": "number"}


def check_schema(schema: Any) -> None:
    """``ValueError`` naming the first place where ``schema`` leaves the supported subset."""
    nodes = 0

    def walk(node: Any, where: str, depth: int) -> None:
        nonlocal nodes
        nodes += 1
        if nodes > MAX_NODES or depth > MAX_DEPTH:
            raise ValueError(f"the schema is too large (at most {MAX_NODES} parts, {MAX_DEPTH} levels deep)")
        if not isinstance(node, dict):
            raise ValueError(f"{where}: a schema is a table (a JSON object)")
        kind = node.get("type")
        if kind is None and "enum" in node:
            kind = "enum"
        if kind != "enum" and kind not in KEYWORDS:
            raise ValueError(f"{where}: type must be one of {', '.join(KEYWORDS)} (got {kind!r})")
        allowed = ANNOTATIONS | ({"enum"} if kind == "enum" else KEYWORDS[kind])
        unknown = sorted(set(node) - allowed)
        if unknown:
            raise ValueError(f"{where}: {', '.join(unknown)} not supported for type {kind} (supported: "
                             f"{', '.join(sorted(allowed - ANNOTATIONS)) or 'nothing more'})")
        if "enum" in node and (not isinstance(node["enum"], list) or not node["enum"]):
            raise ValueError(f"{where}: enum is a non-empty list")
        if kind == "object":
            properties = node.get("properties", {})
            if not isinstance(properties, dict):
                raise ValueError(f"{where}: properties is a table")
            for name, sub in properties.items():
                walk(sub, f"{where}.properties.{name}", depth + 1)
            required = node.get("required", [])
            if not isinstance(required, list) or any(r not in properties for r in required):
                raise ValueError(f"{where}: required lists names of properties")
            extra = node.get("additionalProperties", False)
            if isinstance(extra, dict):
                walk(extra, f"{where}.additionalProperties", depth + 1)
            elif not isinstance(extra, bool):
                raise ValueError(f"{where}: additionalProperties is true, false or a schema")
        if kind == "array" and "items" in node:
            walk(node["items"], f"{where}.items", depth + 1)

    walk(schema, "schema", 0)


def normalized(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema as it is enforced: an object takes the keys it lists and no others unless it says so (JSON
    Schema's default would let a model add keys of its own), compact JSON without optional whitespace."""
    def fix(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        out = {k: fix(v) if k in ("items", "additionalProperties") else v for k, v in node.items()}
        if "properties" in node:
            out["properties"] = {k: fix(v) for k, v in node["properties"].items()}
        if node.get("type") == "object":
            out.setdefault("additionalProperties", False)
        return out

    fixed: dict[str, Any] = fix(schema)
    fixed["x-guidance"] = {"whitespace_flexible": False}
    return fixed


@functools.lru_cache(maxsize=256)
def grammar_for(schema_text: str) -> str:
    """The llguidance grammar of a schema (given as canonical JSON text); ``ValueError`` when it cannot be
    compiled."""
    from llguidance import LLMatcher

    grammar = str(LLMatcher.grammar_from_json_schema(normalized(json.loads(schema_text))))
    problem = LLMatcher.validate_grammar(grammar)
    if problem:
        raise ValueError(f"the schema cannot be compiled: {problem}")
    return grammar
