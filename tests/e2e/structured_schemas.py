"""JSON schemas for the structured-output tests on the default model: nested objects, arrays with bounds, enums,
required fields, numbers with ranges, strings with lengths and patterns. Strings and arrays are bounded so that a
sampled output completes well within the tests' max_tokens."""

from __future__ import annotations

NAME = {"type": "string", "minLength": 1, "maxLength": 16}
WORD = {"type": "string", "maxLength": 10}

SCHEMAS: dict[str, dict] = {
    "person": {
        "type": "object",
        "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"],
    },
    "bool_flag": {
        "type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"],
    },
    "colour_enum": {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "green", "blue", "yellow"]}},
        "required": ["colour"],
    },
    "mixed_enum": {"enum": ["yes", "no", 1, 0, None]},
    "const_version": {
        "type": "object",
        "properties": {"version": {"const": 2}, "label": WORD},
        "required": ["version", "label"],
    },
    "rating": {
        "type": "object",
        "properties": {"stars": {"type": "integer", "minimum": 1, "maximum": 5},
                       "comment": {"type": "string", "maxLength": 24}},
        "required": ["stars", "comment"],
    },
    "temperature_range": {
        "type": "object",
        "properties": {"celsius": {"type": "number", "minimum": -40, "maximum": 50}},
        "required": ["celsius"],
    },
    "exclusive_bounds": {
        "type": "object",
        "properties": {"ratio": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}},
        "required": ["ratio"],
    },
    "bounded_tags": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": WORD, "minItems": 1, "maxItems": 3}},
        "required": ["tags"],
    },
    "int_list": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 2,
                 "maxItems": 4},
    "nested_address": {
        "type": "object",
        "properties": {
            "name": NAME,
            "address": {
                "type": "object",
                "properties": {"city": NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"],
            },
        },
        "required": ["name", "address"],
    },
    "deeply_nested": {
        "type": "object",
        "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {
            "c": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["c"]}}, "required": ["b"]}},
        "required": ["a"],
    },
    "array_of_objects": {
        "type": "object",
        "properties": {"items": {"type": "array", "maxItems": 2, "items": {
            "type": "object",
            "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                           "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["sku", "qty"]}}},
        "required": ["items"],
    },
    "optional_fields": {
        "type": "object",
        "properties": {"title": WORD, "subtitle": WORD, "year": {"type": "integer", "minimum": 1900,
                                                                 "maximum": 2100}},
        "required": ["title"],
    },
    "code_pattern": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[a-z]{2}[0-9]{2}$"}},
        "required": ["code"],
    },
    "short_strings": {
        "type": "object",
        "properties": {"first": {"type": "string", "minLength": 2, "maxLength": 4},
                       "last": {"type": "string", "minLength": 2, "maxLength": 4}},
        "required": ["first", "last"],
    },
    "any_of": {
        "type": "object",
        "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 100},
                                           {"type": "string", "maxLength": 8}]}},
        "required": ["value"],
    },
    "defs_ref": {
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                                             "y": {"type": "integer", "minimum": -9, "maximum": 9}},
                            "required": ["x", "y"]}},
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"],
    },
    "tuple_prefix_items": {
        "type": "array",
        "prefixItems": [{"type": "string", "maxLength": 8}, {"type": "integer", "minimum": 0, "maximum": 9},
                        {"type": "boolean"}],
        "items": False,
    },
    "matrix": {
        "type": "array", "minItems": 1, "maxItems": 2,
        "items": {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "integer", "minimum": 0,
                                                                             "maximum": 9}},
    },
    "status_report": {
        "type": "object",
        "properties": {
            "status": {"enum": ["ok", "degraded", "down"]},
            "latency_ms": {"type": "number", "minimum": 0, "maximum": 1000},
            "checks": {"type": "array", "maxItems": 2,
                       "items": {"type": "object", "properties": {"name": WORD, "passed": {"type": "boolean"}},
                                 "required": ["name", "passed"]}},
        },
        "required": ["status", "latency_ms", "checks"],
    },
    "nullable": {
        "type": "object",
        "properties": {"nickname": {"type": ["string", "null"], "maxLength": 8}},
        "required": ["nickname"],
    },
}
