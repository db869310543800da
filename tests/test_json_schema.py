"""decoding/json_schema.py: schema -> regex, checked against jsonschema (the oracle) with re.fullmatch, and
compiled (and walked) with outlines_core, whose Rust regex engine is what constrained decoding uses."""

import datetime
import itertools
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import pytest

from decoding.constraint import compile_regex
from decoding.json_regex import FORMATS
from decoding.json_schema import SUPPORTED, SchemaError, schema_to_regex, supported_markdown

# jsonschema checks date-time and time only with the optional rfc3339-validator package: check them with
# Python's datetime instead, after an RFC 3339 shape check (fromisoformat alone accepts other ISO 8601 forms).
FORMAT_CHECKER = jsonschema.FormatChecker()
_OFFSET = r"(?:[Zz]|[+-]\d\d:\d\d)"


@FORMAT_CHECKER.checks("date-time", raises=ValueError)
def _date_time(value):
    return not isinstance(value, str) or bool(
        re.fullmatch(rf"\d{{4}}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(?:\.\d+)?{_OFFSET}", value)
        and datetime.datetime.fromisoformat(value.upper()))


@FORMAT_CHECKER.checks("time", raises=ValueError)
def _time(value):
    return not isinstance(value, str) or bool(
        re.fullmatch(rf"\d\d:\d\d:\d\d(?:\.\d+)?{_OFFSET}", value) and datetime.time.fromisoformat(value.upper()))


def oracle(schema, document: str) -> bool:
    try:
        value = json.loads(document)
    except ValueError:
        return False
    return jsonschema.Draft202012Validator(schema, format_checker=FORMAT_CHECKER).is_valid(value)


@dataclass
class Case:
    name: str
    schema: dict | bool
    valid: list[str]  # valid (oracle) and matched
    invalid: list[str]  # invalid (oracle: not JSON, or not valid) and not matched
    outside: list[str] = field(default_factory=list)  # valid, but outside the subset we generate: not matched


OPTIONAL3 = {"type": "object", "additionalProperties": False,
             "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}, "c": {"type": "null"}}}
MEMBERS3 = ['"a":1', '"b":true', '"c":null']
MIXED = {"type": "object", "additionalProperties": False, "required": ["b", "d"],
         "properties": {"a": {"type": "integer"}, "b": {"type": "string"}, "c": {"type": "null"},
                        "d": {"type": "boolean"}}}
POINT = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
         "required": ["x", "y"], "additionalProperties": False}

CASES = [
    Case("date", {"type": "string", "format": "date"},
         ['"2024-02-29"', '"2000-02-29"', '"2023-12-31"', '"0001-01-01"', '"2023-04-30"'],
         ['"2023-02-29"', '"1900-02-29"', '"2024-13-01"', '"2024-04-31"', '"2024-1-01"', '"2024-00-10"',
          '"24-01-01"', '"x"']),
    Case("date-time", {"type": "string", "format": "date-time"},
         ['"2024-05-06T07:08:09Z"', '"2024-05-06T23:59:59.123+05:30"', '"1999-12-31T00:00:00-08:00"'],
         ['"2024-05-06 07:08:09Z"', '"2024-05-06T24:00:00Z"', '"2024-05-06T07:08:09"', '"2024-05-06T07:60:00Z"',
          '"2023-02-29T00:00:00Z"'],
         ['"2024-05-06t07:08:09z"']),
    Case("time", {"type": "string", "format": "time"},
         ['"07:08:09Z"', '"23:59:59.5+01:00"', '"00:00:00.000001-12:00"'],
         ['"24:00:00Z"', '"07:08Z"', '"07:08:09"', '"7:08:09Z"']),
    Case("email", {"type": "string", "format": "email"},
         ['"a@b.co"', '"first.last+tag@mail.example.org"', "\"o'hara@x-y.io\""],
         ['"no-at-sign"', '"plain"', '5'],
         ['"a@b"', '"a..b@c.io"', '"a@b@c.io"', '"a@-b.io"']),
    Case("uuid", {"type": "string", "format": "uuid"},
         ['"123e4567-e89b-12d3-a456-426614174000"', '"00000000-0000-0000-0000-000000000000"'],
         ['"123e4567e89b12d3a456426614174000"', '"123e4567-e89b-12d3-a456-42661417400"',
          '"123e4567-e89b-12d3-a456-42661417400g"'],
         ['"123E4567-E89B-12D3-A456-426614174000"']),
    Case("signed integer range", {"type": "integer", "minimum": -120, "maximum": 45},
         ["-120", "-99", "-7", "0", "9", "10", "45"],
         ["-121", "46", "100", "-1000", "1.5", '"3"', "007", "--1", "+5", ""],
         ["-0", "1.0", "3e1"]),
    Case("integer, exclusive lower bound only", {"type": "integer", "exclusiveMinimum": -3.5},
         ["-3", "0", "7", "1000000000000000000000"],
         ["-4", "-100", "-35"]),
    Case("integer, upper bound only, negative", {"type": "integer", "maximum": -10},
         ["-10", "-11", "-99999"],
         ["-9", "0", "10", "-1"]),
    Case("number", {"type": "number"},
         ["0", "-0.5", "3.14", "1e10", "-2.5E-3", "10", "-0", "1E+2"],
         ["01", ".5", "1.", "+1", "1e", '"1"', "0x10", "- 1"]),
    Case("enum of any values", {"enum": ["red", "green", 3, None, {"a": [1, 2]}, 'é"q', True]},
         ['"red"', '"green"', "3", "null", '{"a":[1,2]}', '"é\\"q"', "true"],
         ['"blue"', "4", '{"a":[1]}', "false", '"Red"'],
         ['{"a": [1, 2]}', '"\\u00e9\\"q"', "3.0"]),
    Case("enum filtered by type", {"type": "string", "enum": ["a", 1, "b", None]},
         ['"a"', '"b"'], ["1", "null", '"c"']),
    Case("const", {"const": {"x": True, "y": [None]}},
         ['{"x":true,"y":[null]}'], ['{"x":false,"y":[null]}', '{"x":true}'], ['{"y":[null],"x":true}']),
    Case("nested objects with arrays", {
        "type": "object", "additionalProperties": False, "required": ["name", "address"],
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
            "address": {"type": "object", "additionalProperties": False, "required": ["city"],
                        "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}},
            "scores": {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0}}}}},
        ['{"name":"Ann","address":{"city":"Oslo"}}',
         '{"name":"Bo","tags":[],"address":{"city":"Rome","zip":"00184"},"scores":[[1,2],[],[30]]}',
         '{"name":"C","tags":["a","bcdef","x"],"address":{"city":"","zip":"12345"}}'],
        ['{"name":"","address":{"city":"Oslo"}}', '{"name":"Ann"}', '{"name":"Ann","address":{"zip":"12345"}}',
         '{"name":"Ann","address":{"city":"Oslo","zip":"1234"}}',
         '{"name":"Ann","tags":["toolong"],"address":{"city":"x"}}',
         '{"name":"Ann","tags":["a","b","c","d"],"address":{"city":"x"}}',
         '{"name":"Ann","address":{"city":"Oslo"},"extra":1}', '{"name":"Ann","address":{"city":"Oslo","x":1}}',
         '{"name":"Ann","address":{"city":"Oslo"},"scores":[[-1]]}'],
        ['{"address":{"city":"Oslo"},"name":"Ann"}']),
    Case("anyOf", {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "string", "format": "uuid"},
                             {"type": "null"}]},
         ["0", "9", "null", '"123e4567-e89b-12d3-a456-426614174000"'],
         ["10", "-1", '"x"', "true"]),
    Case("anyOf merged with its siblings", {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
        "anyOf": [{"required": ["a"]}, {"required": ["b"]}]},
        ['{"a":1}', '{"b":"x"}', '{"a":1,"b":"x"}'], ["{}", '{"a":"x"}']),
    Case("type list", {"type": ["integer", "null"], "minimum": 1},
         ["1", "null", "250"], ["0", '"x"', "-3"]),
    Case("optional properties, all 2^3 subsets", OPTIONAL3,
         ["{" + ",".join(m for m, keep in zip(MEMBERS3, mask) if keep) + "}"
          for mask in itertools.product([0, 1], repeat=3)],
         ['{,"b":true}', '{"a":1,}', '{"a":1"b":true}', '{"a":1,,"c":null}', '{"a":1,"b":true,"c":null,}', '{,}',
          '{"d":1}', '{"a":1,"d":1}', '{"a":"1"}'],
         ['{"b":true,"a":1}', '{"c":null,"a":1}']),
    Case("optional and required properties interleaved", MIXED,
         ["{" + ",".join(filter(None, [a, '"b":"x"', c, '"d":false'])) + "}"
          for a in ("", '"a":1') for c in ("", '"c":null')],
         ['{"b":"x"}', '{"d":true}', '{"a":1,"c":null}', '{,"b":"x","d":true}', '{"b":"x",,"d":true}',
          '{"b":"x","d":true,}'],
         ['{"d":true,"b":"x"}']),
    Case("array length bounds", {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4},
         ["[1,2]", "[1,2,3]", "[1,2,3,4]", "[-5,0]"],
         ["[]", "[1]", "[1,2,3,4,5]", "[1,,2]", "[1,2,]", '[1,"2"]'],
         ["[1, 2]"]),
    # (under a member: outlines_core compiles a document that opens with an unconstrained array slowly)
    Case("array of anything",
         {"type": "object", "properties": {"list": {"type": "array", "maxItems": 2}}, "required": ["list"]},
         ['{"list":[]}', '{"list":[1,"a"]}', '{"list":[{"k":[null]}]}', '{"list":[[[true]]]}'],
         ['{"list":[1,2,3]}', '{"list":{}}', '{"list":[1,]}'], ['{"list":[[[[1]]]]}']),
    Case("string length with escapes", {"type": "string", "minLength": 2, "maxLength": 3},
         ['"ab"', '"abc"', '"a\\n"', '"\\u00e9x"', '"\\ud83d\\ude00!"', '"é😀"', '"\\"\\\\\\/"', '"\\u0000\\t"'],
         ['"a"', '"abcd"', '"\\n\\t\\"\\\\"', '"a\x01"', '"\\x41b"', '"\\u00e"', '""', '"\\ud83d\\ude00"'],
         ['"a\\ud83d"']),
    Case("$ref to $defs and definitions", {
        "$defs": {"point": POINT}, "definitions": {"label": {"type": "string", "maxLength": 3}},
        "type": "object", "additionalProperties": False, "required": ["from", "to"],
        "properties": {"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point", "description": "end"},
                       "label": {"$ref": "#/definitions/label"}}},
        ['{"from":{"x":1,"y":2},"to":{"x":-3,"y":0}}', '{"from":{"x":1,"y":2},"to":{"x":0,"y":0},"label":"abc"}'],
        ['{"from":{"x":1},"to":{"x":0,"y":0}}', '{"from":{"x":1,"y":2},"to":{"x":0,"y":0},"label":"abcd"}',
         '{"from":{"x":1,"y":2,"z":3},"to":{"x":0,"y":0}}']),
    Case("allOf", {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                             {"properties": {"b": {"type": "string"}, "a": {"minimum": 0}}, "required": ["b"]}]},
         ['{"a":1,"b":"x"}', '{"a":0,"b":""}'], ['{"a":1}', '{"b":"x"}', '{"a":-1,"b":"x"}']),
    Case("additionalProperties true",
         {"type": "object", "properties": {"id": {"type": "integer"}, "ab": {"type": "null"}}, "required": ["id"],
          "additionalProperties": True},
         ['{"id":1}', '{"id":1,"x":[1,{"y":null}]}', '{"id":2,"i":"s","idx":true,"a":1,"abc":2}',
          '{"id":1,"ab":null,"z":{}}'],
         ['{"id":1,"id":"x"}', '{"x":1}', '{"id":1,"ab":3}', '{"id":1,"x":1,"ab":3}'],
         ['{"x":1,"id":1}', '{"id":1,"\\u0078":1}']),
    Case("additionalProperties schema", {"type": "object", "properties": {"a": {"type": "null"}},
                                         "additionalProperties": {"type": "integer"}},
         ['{"a":null,"b":1}', '{"z":2}', "{}", '{"a":null}', '{"aa":3,"b":4}', '{"\\n":5}'],
         ['{"b":"x"}', '{"a":1}', '{"a":null,"a":1}']),
    Case("pattern, unanchored", {"type": "string", "pattern": "a\\d"},
         ['"a1"', '"xxa9yy"', '"\\"a0"'], ['"a"', '"ab"', '"A1"'], ['"a٣"']),  # \d: ECMA's [0-9], not Python's
    Case("pattern with escaped characters", {"type": "string", "pattern": '^[\\s"\\\\]+$'},
         ['" \\t\\n\\""', '"\\\\"'], ['"x"', '""'], ['"\\u0020"']),
    Case("pattern, alternatives anchored separately", {"type": "string", "pattern": "^ab|cd$"},
         ['"ab"', '"abzz"', '"zzcd"'], ['"zab"', '"cdz"']),
    Case("any value", {}, ["1", '"x"', "null", '[{"a":1}]', '{"k":{"k":1}}', "[]", "[[]]"],
         ["[", "{1:2}", "tru", "[1,]"],
         ["[[[1]]]", '{"k":{"k":[]}}']),
    Case("true schema", True, ["false", "[]"], ["", "]"]),
]
FLEXIBLE = ["nested objects with arrays", "optional properties, all 2^3 subsets", "$ref to $defs and definitions",
            "array length bounds", "anyOf merged with its siblings", "additionalProperties true"]
BY_NAME = {case.name: case for case in CASES}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_schema_cases(case):
    pattern = re.compile(schema_to_regex(case.schema))
    for doc in case.valid:
        assert oracle(case.schema, doc), f"test data: {doc!r} should be valid"
        assert pattern.fullmatch(doc), f"valid {doc!r} does not match"
    for doc in case.invalid:
        assert not oracle(case.schema, doc), f"test data: {doc!r} should be invalid"
        assert not pattern.fullmatch(doc), f"invalid {doc!r} matches"
    for doc in case.outside:
        assert oracle(case.schema, doc), f"test data: {doc!r} should be valid"
        assert not pattern.fullmatch(doc), f"{doc!r}, outside the subset, matches"


def pretty(doc: str) -> str:
    return json.dumps(json.loads(doc), indent=2, ensure_ascii=False)


@pytest.mark.parametrize("name", FLEXIBLE)
def test_flexible_whitespace(name):
    case = BY_NAME[name]
    flexible = re.compile(schema_to_regex(case.schema, whitespace="flexible"))
    compact = re.compile(schema_to_regex(case.schema))
    for doc in case.valid:
        spaced = json.dumps(json.loads(doc), separators=(", ", ": "))
        for variant in (doc, spaced, pretty(doc)):
            assert flexible.fullmatch(variant), variant
        assert compact.fullmatch(spaced) is None or spaced == doc
    for doc in case.invalid:
        assert not flexible.fullmatch(doc)
    assert not flexible.fullmatch(" " + case.valid[0]) and not flexible.fullmatch(case.valid[0] + "\n")


def test_flexible_whitespace_is_bounded():
    regex = re.compile(schema_to_regex({"type": "array", "items": {"type": "integer"}}, whitespace="flexible"))
    assert regex.fullmatch("[" + " " * 16 + "1\t,\r\n2]")
    assert not regex.fullmatch("[" + " " * 17 + "1]")
    with pytest.raises(ValueError, match="whitespace must be one of compact, flexible, got 'pretty'"):
        schema_to_regex({}, whitespace="pretty")


def test_integer_ranges_random():
    rng = random.Random(0)
    pairs = [(0, 0), (-1, -1), (9, 10), (99, 1000), (-1000, -999), (1, 9), (-10, 10), (-1000, 1000)]
    pairs += [tuple(sorted(rng.randint(-1000, 1000) for _ in range(2))) for _ in range(60)]
    for lo, hi in pairs:
        pattern = re.compile(schema_to_regex({"type": "integer", "minimum": lo, "maximum": hi}))
        for n in range(lo - 50, hi + 51):
            assert bool(pattern.fullmatch(str(n))) == (lo <= n <= hi), (lo, hi, n)
        assert not pattern.fullmatch("-0") and not pattern.fullmatch("0" + str(abs(lo)))


def test_integer_one_sided_bounds_random():
    rng = random.Random(1)
    far = [10**k for k in range(1, 25)]
    for bound in [0, -1, 1, 9, 10, -10, 999, -1000] + [rng.randint(-1000, 1000) for _ in range(30)]:
        above = re.compile(schema_to_regex({"type": "integer", "minimum": bound}))
        below = re.compile(schema_to_regex({"type": "integer", "exclusiveMaximum": bound + 1}))
        for n in list(range(bound - 1100, bound + 1100)) + far + [-n for n in far]:
            assert bool(above.fullmatch(str(n))) == (n >= bound), (bound, n)
            assert bool(below.fullmatch(str(n))) == (n <= bound), (bound, n)


def test_integer_fractional_and_exclusive_bounds():
    regex = re.compile(schema_to_regex({"type": "integer", "minimum": -2.5, "exclusiveMaximum": 7,
                                        "maximum": 100, "exclusiveMinimum": -5}))
    assert [n for n in range(-20, 20) if regex.fullmatch(str(n))] == list(range(-2, 7))


def test_unbounded_integer():
    regex = re.compile(schema_to_regex({"type": "integer"}))
    assert all(regex.fullmatch(s) for s in ["0", "-1", "7", "1234567890123"])
    assert not any(regex.fullmatch(s) for s in ["-0", "01", "1.0", "", "-"])


# ---- every regex compiles into a token automaton (decoding/constraint.py: outlines_core's Rust regex engine)
# ---- and accepts and rejects what Python's re does on the documents ---------------------------------------

MULTI_TOKENS = [b'{"', b'":', b'",', b'"}', b"true", b"false", b"null", b"12", b"-0", b"\\n", b"2024-", b"  "]
EOS = 0
VOCAB = [None] + [bytes([b]) for b in range(256)] + MULTI_TOKENS  # id = byte + 1; 0 is EOS
TOKEN = {piece: i for i, piece in enumerate(VOCAB) if piece is not None}


def automaton_of(regex: str):
    return compile_regex(regex, VOCAB, len(VOCAB), eos_id=EOS)


def walk(automaton, document: str) -> bool:
    """Whether the automaton accepts the document, fed one byte token at a time."""
    return automaton.check([b + 1 for b in document.encode()], [EOS]) == "complete"


COMPILE_CASES = [(c, "compact") for c in CASES] + [(BY_NAME[n], "flexible") for n in FLEXIBLE]


@pytest.mark.parametrize("case,whitespace", COMPILE_CASES, ids=[f"{c.name}-{w}" for c, w in COMPILE_CASES])
def test_compiles_into_a_token_automaton(case, whitespace):
    automaton = automaton_of(schema_to_regex(case.schema, whitespace=whitespace))
    if whitespace == "compact":  # Rust's engine accepts and rejects what Python's does
        assert all(walk(automaton, doc) for doc in case.valid)
        assert not any(walk(automaton, doc) for doc in case.invalid + case.outside)
    else:
        assert all(walk(automaton, pretty(doc)) for doc in case.valid)


def test_a_complete_number_can_still_grow():
    """outlines_core alone keeps no transition out of a complete match into an incomplete prefix ("3" could
    never become "3.14"); decoding/constraint.py's end marker gives the whole language back."""
    number = automaton_of(schema_to_regex({"type": "number"}))
    assert all(walk(number, doc) for doc in ("3", "-0", "3.14", "1e5", "-0.5E-3"))
    assert not any(walk(number, doc) for doc in ("3.", "01", "1e", "--1"))


def test_multi_byte_tokens():
    automaton = automaton_of(schema_to_regex(OPTIONAL3))
    assert automaton.check([TOKEN[b'{"'], TOKEN[b"c"], TOKEN[b'":'], TOKEN[b"null"], TOKEN[b"}"]], [EOS]) == "complete"
    assert automaton.check([TOKEN[b"true"]], [EOS]) == "invalid"
    assert automaton.check([TOKEN[b"{"], TOKEN[b'"}']], [EOS]) == "invalid"


# ---- refusals: one-line SchemaErrors naming the keyword and its path ----------------------------------------

KEYWORDS = ", ".join(SUPPORTED)
ERRORS = [
    ({"type": "integer", "multipleOf": 3}, f"schema: unsupported keyword 'multipleOf' (supported: {KEYWORDS})"),
    ({"type": "object", "properties": {"age": {"type": "integer", "multipleOf": 2}}},
     f"schema.properties.age: unsupported keyword 'multipleOf' (supported: {KEYWORDS})"),
    ({"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "object", "properties": {"x": {"not": {}}}}]}},
     f"schema.items.anyOf[1].properties.x: unsupported keyword 'not' (supported: {KEYWORDS})"),
    ({"$defs": {"A": {"type": "array", "uniqueItems": True}}, "$ref": "#/$defs/A"},
     f"schema.$defs.A: unsupported keyword 'uniqueItems' (supported: {KEYWORDS})"),
    ({"type": "object", "patternProperties": {"^x": {}}},
     f"schema: unsupported keyword 'patternProperties' (supported: {KEYWORDS})"),
    ({"if": {}, "then": {}}, f"schema: unsupported keyword 'if' (supported: {KEYWORDS})"),
    ({"type": "object", "properties": {"a": {"oneOf": [{}]}}},
     f"schema.properties.a: unsupported keyword 'oneOf' (supported: {KEYWORDS})"),
    ({"type": "array", "contains": {"type": "integer"}},
     f"schema: unsupported keyword 'contains' (supported: {KEYWORDS})"),
    ({"type": "object", "additionalProperties": {"minProperties": 1}},
     f"schema.additionalProperties: unsupported keyword 'minProperties' (supported: {KEYWORDS})"),
    ({"$defs": {"Node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/Node"}}}}, "$ref": "#/$defs/Node"},
     "schema.$defs.Node.properties.next: recursive $ref cycle #/$defs/Node -> #/$defs/Node"),
    ({"$defs": {"A": {"type": "array", "items": {"$ref": "#/$defs/B"}},
                "B": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/A"}]}},
      "type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}},
     "schema.$defs.B.anyOf[1]: recursive $ref cycle #/$defs/A -> #/$defs/B -> #/$defs/A"),
    ({"$ref": "https://example.com/s.json"},
     "schema: unsupported $ref 'https://example.com/s.json' (only local '#/$defs/<name>' or '#/definitions/<name>')"),
    ({"type": "object", "properties": {"a": {"$ref": "#/properties/b"}, "b": {}}},
     "schema.properties.a: unsupported $ref '#/properties/b' (only local '#/$defs/<name>' or '#/definitions/<name>')"),
    ({"$ref": "#/$defs/missing"}, "schema: $ref '#/$defs/missing' points to nothing"),
    ({"type": "object", "properties": {"ip": {"type": "string", "format": "ipv4"}}},
     "schema.properties.ip: unsupported format 'ipv4' (supported: date, time, date-time, email, uuid)"),
    ({"type": "object", "properties": {"price": {"type": "number", "minimum": 0}}},
     "schema.properties.price: 'minimum' on type 'number' is unsupported (bounds are only supported on integers)"),
    ({"exclusiveMaximum": 3},
     "schema: 'exclusiveMaximum' on type 'number' is unsupported (bounds are only supported on integers)"),
    ({"type": "integer", "minimum": 5, "exclusiveMaximum": 5}, "schema: no integer lies within the bounds"),
    ({"type": "integer", "exclusiveMinimum": True},
     "schema: 'exclusiveMinimum' must be a finite number (draft 2020-12), got True"),
    ({"type": "string", "pattern": "(?=a)b"}, "schema: pattern '(?=a)b' uses unsupported lookaround"),
    ({"type": "string", "pattern": "(a)\\1"}, "schema: pattern '(a)\\\\1' uses unsupported backreferences"),
    ({"type": "string", "pattern": "a\\bc"},
     "schema: pattern 'a\\\\bc' uses unsupported anchors or word boundaries inside the pattern"),
    ({"type": "string", "pattern": "(?i)abc"}, "schema: pattern '(?i)abc': inline flags are unsupported"),
    ({"type": "string", "pattern": "a(", },
     "schema: cannot parse pattern 'a(': missing ), unterminated subpattern at position 1"),
    ({"type": "string", "pattern": "^a+$", "maxLength": 3},
     "schema: 'pattern' cannot be combined with 'maxLength' (a regex cannot intersect them)"),
    ({"type": "string", "format": "date", "minLength": 3},
     "schema: 'format' cannot be combined with 'minLength' (a regex cannot intersect them)"),
    ({"type": "string", "enum": ["a", "bb"], "minLength": 2},
     "schema: 'minLength' cannot be combined with 'enum'/'const' (only 'type' can)"),
    ({"type": "integer", "enum": ["a"]}, "schema: no 'enum'/'const' value satisfies the schema"),
    ({"enum": [float("nan")]}, "schema: nan is not a JSON value (Out of range float values are not JSON compliant)"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]},
     "schema: required property 'b' is not in 'properties'"),
    ({"type": "object", "properties": {"a": False}, "required": ["a"]},
     "schema.properties.a: the false schema matches nothing"),
    (False, "schema: the false schema matches nothing"),
    ({"type": "array", "items": [{"type": "integer"}]}, "schema: 'items' as a list (tuple validation) is unsupported"),
    ({"type": "array", "minItems": 3, "maxItems": 2}, "schema: 'minItems' 3 exceeds 'maxItems' 2"),
    ({"type": "string", "maxLength": -1}, "schema: 'maxLength' must be a non-negative integer, got -1"),
    ({"type": "date"}, "schema: 'type' must be one of object, array, string, integer, number, boolean, null "
                       "or a non-empty list of them, got 'date'"),
    ({"allOf": [{"type": "object", "properties": {"a": {}}, "additionalProperties": False}, {"properties": {"b": {}}}]},
     "schema.allOf[1]: cannot merge schemas where one's 'additionalProperties' applies to another's 'properties'"),
    ({"allOf": [{"type": "string", "pattern": "a"}, {"pattern": "b"}]},
     "schema.allOf[1]: cannot merge two different 'pattern' (allOf, or keywords beside $ref/anyOf)"),
    ({"allOf": [{"type": "string"}, {"type": "integer"}]},
     "schema.allOf[1]: no value has both type 'string' and type 'integer'"),
    ({"type": "object", "properties": {"a": {"$id": "x", "type": "null"}}},
     "schema.properties.a: '$id' is only supported at the root"),
    ({"anyOf": []}, "schema: 'anyOf' must be a non-empty list of schemas"),
]


@pytest.mark.parametrize("schema,message", ERRORS, ids=[m.split(": ", 1)[1][:40] for _, m in ERRORS])
def test_refusals(schema, message):
    with pytest.raises(SchemaError) as error:
        schema_to_regex(schema)
    assert str(error.value) == message
    assert "\n" not in message and isinstance(error.value, ValueError)


def test_ignored_annotations_and_root_id():
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "https://x/y.json", "title": "T",
              "description": "d", "$comment": "c", "examples": [1], "default": 1, "deprecated": False,
              "readOnly": False, "writeOnly": False, "type": "integer", "minimum": 1, "maximum": 3}
    assert re.fullmatch(schema_to_regex(schema), "2") and not re.fullmatch(schema_to_regex(schema), "4")
    with_ref = {"$id": "https://x/y.json", "$defs": {"a": {"type": "null"}}, "$ref": "#/$defs/a"}
    assert schema_to_regex(with_ref) == "null"


def test_supported_table():
    table = supported_markdown()
    assert table.startswith("| keyword | supported how |\n|---|---|\n")
    assert all(f"`{keyword}`" in table for keyword in SUPPORTED)
    assert table in schema_to_regex.__doc__
    assert set(FORMATS) == {"date", "time", "date-time", "email", "uuid"}


def test_the_readme_table_is_the_supported_table():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert supported_markdown().strip() in readme
