"""JSON schemas for structured-output tests and benchmarks.

`TEST_SCHEMAS` covers what applications send (nested objects, arrays with bounds, enums,
`required`, bounded numbers, strings with `pattern`, `anyOf`, `const`, nullable fields), each
bounded so that even a random tiny decoder finishes the answer within the tiny models'
context: a string without maxLength, pattern or enum could run on for hundreds of tokens
before a random model picks its closing quote.
"""

from __future__ import annotations

from typing import Any

_NAME = {"type": "string", "maxLength": 8}
_SHORT = {"type": "string", "maxLength": 5}

TEST_SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"name": _NAME}, "required": ["name"], "additionalProperties": False},
    {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["age"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}}, "required": ["colour"], "additionalProperties": False},
    {
        "type": "object",
        "properties": {"name": _NAME, "age": {"type": "integer", "minimum": 18, "maximum": 99}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": _SHORT, "minItems": 1, "maxItems": 3}},
        "required": ["tags"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 4}},
        "required": ["scores"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
        "required": ["code"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"date": {"type": "string", "pattern": "^20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]$"}},
        "required": ["date"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"address": {"type": "object", "properties": {"city": _NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["city", "zip"], "additionalProperties": False}},
        "required": ["address"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 50}, {"type": "boolean"}]}},
        "required": ["value"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"id": {"anyOf": [{"type": "string", "pattern": "^u[0-9]{3}$"}, {"type": "null"}]}},
        "required": ["id"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"kind": {"const": "invoice"}, "total": {"type": "integer", "minimum": 1, "maximum": 9999}},
        "required": ["kind", "total"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[a-z]{2}[0-9]$"}, "qty": {"type": "integer", "minimum": 1, "maximum": 5}}, "required": ["sku", "qty"], "additionalProperties": False}, "minItems": 1, "maxItems": 2}},
        "required": ["items"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"level": {"enum": ["low", "mid", "high"]}, "urgent": {"type": "boolean"}},
        "required": ["level", "urgent"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1, "maxItems": 5},
    {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 2, "maxItems": 2},
    {"enum": ["yes", "no", "maybe"]},
    {"type": "integer", "minimum": 100, "maximum": 200},
    {"type": "string", "pattern": "^[a-f0-9]{6}$"},
    {
        "type": "object",
        "properties": {"temp": {"type": "number", "minimum": -10, "maximum": 40}},
        "required": ["temp"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 3}, "b": {"type": "integer", "minimum": 0, "maximum": 3}, "c": {"type": "integer", "minimum": 0, "maximum": 3}},
        "required": ["a", "b", "c"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"user": {"type": "object", "properties": {"name": _SHORT, "roles": {"type": "array", "items": {"enum": ["admin", "dev", "ops"]}, "maxItems": 2}}, "required": ["name", "roles"], "additionalProperties": False}},
        "required": ["user"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"note": {"anyOf": [_SHORT, {"type": "null"}]}, "count": {"type": "integer", "minimum": 0, "maximum": 10}},
        "required": ["note", "count"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90}, "lon": {"type": "number", "minimum": -180, "maximum": 180}},
        "required": ["lat", "lon"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"matrix": {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 1}, "minItems": 2, "maxItems": 2}, "minItems": 2, "maxItems": 2}},
        "required": ["matrix"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"status": {"enum": ["open", "closed"]}, "owner": {"anyOf": [{"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99}}, "required": ["id"], "additionalProperties": False}, {"type": "null"}]}},
        "required": ["status", "owner"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"email": {"type": "string", "pattern": "^[a-z]{1,6}@[a-z]{1,6}\\.(com|org)$"}},
        "required": ["email"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"flags": {"type": "array", "items": {"type": "boolean"}, "minItems": 3, "maxItems": 3}},
        "required": ["flags"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "title": _NAME,
            "meta": {"type": "object", "properties": {"pages": {"type": "integer", "minimum": 1, "maximum": 500}, "lang": {"enum": ["en", "de", "fr"]}}, "required": ["pages", "lang"], "additionalProperties": False},
        },
        "required": ["title", "meta"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"choice": {"anyOf": [{"const": "A"}, {"const": "B"}, {"type": "integer", "minimum": 1, "maximum": 3}]}},
        "required": ["choice"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {"optional": _SHORT, "needed": {"type": "boolean"}},
        "required": ["needed"],
        "additionalProperties": False,
    },
]
