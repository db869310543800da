"""JSON schema -> regular expression, the first step of constrained decoding.

`schema_to_regex(schema)` returns a regex whose matches are JSON documents valid under `schema`; another
module compiles it into a token automaton with outlines_core. Only an explicit subset of JSON Schema is
implemented (`SUPPORTED`, rendered as a table by `supported_markdown()`); anything else raises `SchemaError`
naming the keyword and its path: a constraint we silently dropped would let the model write invalid
documents (outlines_core's own converter ignores e.g. `minimum`).

The matches are a subset of the valid documents, chosen to be easy for a model to write:
  - one serialisation: no whitespace between tokens (whitespace="compact", the default), or up to 16 JSON
    whitespace characters at each place JSON allows them (whitespace="flexible"), never before or after
    the document; `enum`/`const` values are always written compactly, as json.dumps(separators=(",", ":"),
    ensure_ascii=False) writes them;
  - object members in the schema's declared order, then (if allowed) any extra members;
  - an absent `additionalProperties` means false when `properties` is given (true otherwise);
  - integers without fraction or exponent, and never `-0`;
  - values of unconstrained schemas (`{}`, `true`, extra members) nest containers at most ANY_VALUE_DEPTH deep;
  - strings from `pattern` and extra member names use json.dumps' escapes only (`\\"`, `\\\\`, `\\n`...,
    `\\u00XX` for other control characters); other strings allow every JSON escape. Lone surrogate escapes
    are never produced.

The regex keeps to the syntax that both Rust's regex crate (what outlines_core compiles; no lookaround, no
backreferences) and Python's `re` (what the tests fullmatch with) read the same way: `(?:...)` groups,
`{m,n}` but never `{,n}`, `[0-9]` rather than `\\d` (Unicode digits in both), every ASCII punctuation
character that either engine treats as special escaped, inside classes too (Rust reads `&&`, `--`, `~~`
as set operations), and characters outside printable ASCII written `\\xHH` / `\\uHHHH` / `\\UHHHHHHHH`.
Rust also refuses groups nested more than ~250 deep, which bounds how deeply schemas can nest.

Alternatives are ordered longest first (integer ranges, enums): outlines_core's DFA is leftmost-first,
and without decoding/constraint.py's end marker a complete "1" would cut off "12" in 1|12; with it the
order no longer matters, and a bare number may still grow from "3" to "3.14".
"""

from __future__ import annotations

import json
import math
import re
import re._parser as _re_parser  # the only parser of Python's regex syntax; used for `pattern`
from fractions import Fraction

from decoding import json_regex as rx


class SchemaError(ValueError):
    """The schema uses something outside the supported subset, or is malformed."""


# Containers nested in a value of an unconstrained schema ([[1]] is depth 2). Bounded because a regex cannot
# count brackets; 2, because outlines_core also builds the unanchored DFA, which blows up on a document that
# opens with an unconstrained container: outlines_core.Index of {"type": "array"} / {"type": "object"} takes
# ~4 / ~5 s at depth 2 (~13 / ~21 s with flexible whitespace) and ~5 min for [any, any] at depth 3, against
# milliseconds when the container sits behind a declared member ({"x": ...}).
ANY_VALUE_DEPTH = 2
WHITESPACE = {"compact": "", "flexible": r"[ \t\n\r]{0,16}"}

_ANNOTATION = "annotation: ignored"
_BOUNDS = ("integer: exact decimal digit-range regex, one- or two-sided, any signs, bounds may be fractional; "
           "refused on `number`")
_LENGTHS = ("string: bounds on the number of characters (an escape is one character, a surrogate-pair escape too); "
            "not combined with `pattern` or `format`")
_ITEM_COUNTS = "array: bounds on the number of items (bounded repetition)"
_DEFS = "where local `$ref`s look; only what is referenced is compiled"
SUPPORTED = {
    "type": ("`object`, `array`, `string`, `integer`, `number`, `boolean`, `null`, or a list (any of them); "
             "absent: the types of the type-specific keywords present, or any JSON value if there are none"),
    "properties": "object: members in the schema's declared order",
    "required": "object: these members are always present, the others may be omitted",
    "additionalProperties": (f"object: false: no other members; true (any value, nested at most {ANY_VALUE_DEPTH} "
                             "deep) or a schema: extra members after the declared ones, named unlike any declared "
                             "one; absent: false if `properties` is given, else true"),
    "items": "array: the schema of every item (absent: any JSON value); a list (tuple form) is refused",
    "minItems": _ITEM_COUNTS,
    "maxItems": _ITEM_COUNTS,
    "minLength": _LENGTHS,
    "maxLength": _LENGTHS,
    "pattern": ("string: Python `re` syntax with ECMA-262 meanings of `\\d \\w \\s .`, searched anywhere in the "
                "string unless anchored by `^` / `$` (at its ends or at those of top-level alternatives); no "
                "flags, lookaround, backreferences or `\\b`"),
    "format": "string: `date`, `date-time`, `time`, `email`, `uuid` (regexes in `FORMATS`); others are refused",
    "minimum": _BOUNDS,
    "maximum": _BOUNDS,
    "exclusiveMinimum": _BOUNDS,
    "exclusiveMaximum": _BOUNDS,
    "enum": ("any JSON values, written compactly, non-ASCII kept; only `type` may sit beside it (keeps the values "
             "of those types)"),
    "const": "as a one-value `enum`",
    "anyOf": "alternatives; the keywords beside it are merged into each (as `allOf`)",
    "allOf": ("merged into one schema: `properties` and `required` united, `type`s intersected, other keywords "
              "must not differ; refused where one part's `additionalProperties` would judge another's properties"),
    "$ref": "local `#/$defs/<name>` or `#/definitions/<name>`, not recursive; keywords beside it merged (as `allOf`)",
    "$defs": _DEFS,
    "definitions": _DEFS,
    "$id": "annotation at the root only (nested ones would move where `$ref`s point)",
    "$schema": _ANNOTATION,
    "$comment": _ANNOTATION,
    "title": _ANNOTATION,
    "description": _ANNOTATION,
    "default": _ANNOTATION,
    "examples": _ANNOTATION,
    "deprecated": _ANNOTATION,
    "readOnly": _ANNOTATION,
    "writeOnly": _ANNOTATION,
}
_NON_CONSTRAINTS = {k for k, v in SUPPORTED.items() if v in (_ANNOTATION, _DEFS)} | {"$id"}
_KEYWORD_TYPES = {  # for schemas without "type"
    "properties": "object", "required": "object", "additionalProperties": "object",
    "items": "array", "minItems": "array", "maxItems": "array",
    "minLength": "string", "maxLength": "string", "pattern": "string", "format": "string",
    "minimum": "number", "maximum": "number", "exclusiveMinimum": "number", "exclusiveMaximum": "number",
}
_TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")


def supported_markdown() -> str:
    """SUPPORTED as a markdown table (keywords with the same description share a row)."""
    rows = {}
    for keyword, how in SUPPORTED.items():
        rows.setdefault(how, []).append(f"`{keyword}`")
    lines = ["| keyword | supported how |", "|---|---|"]
    lines += [f"| {', '.join(keywords)} | {how} |" for how, keywords in rows.items()]
    return "\n".join(lines)


# ---- pattern: a regex over decoded characters -> a regex over JSON's encoding of them --------------------

_LINE_TERMINATORS = [(0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029)]  # what ECMA-262's "." excludes
_ECMA_SPACE = [(0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A), (0x2028, 0x2029),
               (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000), (0xFEFF, 0xFEFF)]
_ECMA_WORD = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
_CATEGORIES = {  # ECMA-262 meanings (ASCII \d and \w), not Python's Unicode ones
    _re_parser.CATEGORY_DIGIT: [(0x30, 0x39)], _re_parser.CATEGORY_NOT_DIGIT: rx.complement([(0x30, 0x39)]),
    _re_parser.CATEGORY_SPACE: _ECMA_SPACE, _re_parser.CATEGORY_NOT_SPACE: rx.complement(_ECMA_SPACE),
    _re_parser.CATEGORY_WORD: _ECMA_WORD, _re_parser.CATEGORY_NOT_WORD: rx.complement(_ECMA_WORD),
}
_BEGIN = ((_re_parser.AT, _re_parser.AT_BEGINNING), (_re_parser.AT, _re_parser.AT_BEGINNING_STRING))
_END = ((_re_parser.AT, _re_parser.AT_END), (_re_parser.AT, _re_parser.AT_END_STRING))
_PATTERN_FEATURES = {  # regex constructs we refuse, by parser opcode name
    "GROUPREF": "backreferences", "GROUPREF_EXISTS": "conditionals", "ASSERT": "lookaround",
    "ASSERT_NOT": "lookaround", "ATOMIC_GROUP": "atomic groups", "POSSESSIVE_REPEAT": "possessive quantifiers",
    "AT": "anchors or word boundaries inside the pattern",
}


def _pattern_regex(pattern, path: str) -> str:
    """The string-content regex for `pattern`, which JSON Schema searches for in the decoded string."""
    if not isinstance(pattern, str):
        raise SchemaError(f"{path}: 'pattern' must be a string, got {pattern!r}")
    try:
        parsed = _re_parser.parse(pattern)
    except re.error as e:
        raise SchemaError(f"{path}: cannot parse pattern {pattern!r}: {e}") from None
    if parsed.state.flags & ~re.UNICODE:  # str patterns always carry UNICODE; anything else came from (?...)
        raise SchemaError(f"{path}: pattern {pattern!r}: inline flags are unsupported")

    def sequence(items) -> str:
        return "".join(item(op, av) for op, av in items)

    def chars(ranges) -> str:
        if not rx.intersect(ranges, rx.UNIVERSE):
            raise SchemaError(f"{path}: pattern {pattern!r} has a character class that matches nothing")
        return rx.encode_chars(ranges)

    def item(op, av) -> str:
        if op is _re_parser.LITERAL:
            return chars([(av, av)])
        if op is _re_parser.NOT_LITERAL:
            return chars(rx.complement([(av, av)]))
        if op is _re_parser.ANY:
            return chars(rx.complement(_LINE_TERMINATORS))
        if op is _re_parser.IN:
            ranges = [r for o, a in av for r in ([(a, a)] if o is _re_parser.LITERAL else [a] if o is _re_parser.RANGE
                                                 else _CATEGORIES[a] if o is _re_parser.CATEGORY else [])]
            return chars(rx.complement(ranges) if av[0][0] is _re_parser.NEGATE else rx.normalize(ranges))
        if op is _re_parser.BRANCH:
            return rx.alt([sequence(alternative) for alternative in av[1]])
        if op is _re_parser.SUBPATTERN:
            if av[1] or av[2]:
                raise SchemaError(f"{path}: pattern {pattern!r}: inline flags are unsupported")
            return f"(?:{sequence(av[3])})"
        if op in (_re_parser.MAX_REPEAT, _re_parser.MIN_REPEAT):  # laziness does not change what matches
            lo, hi, sub = av
            return rx.repeat(sequence(sub), lo, None if hi is _re_parser.MAXREPEAT else hi)
        feature = _PATTERN_FEATURES.get(str(op), str(op))
        raise SchemaError(f"{path}: pattern {pattern!r} uses unsupported {feature}")

    items = list(parsed)
    top = [list(a) for a in items[0][1][1]] if len(items) == 1 and items[0][0] is _re_parser.BRANCH else [items]
    anywhere = rx.repeat(rx.STRING_CHAR, 0, None)
    options = []
    for alternative in top:
        begins = bool(alternative) and alternative[0] in _BEGIN
        ends = len(alternative) > begins and alternative[-1] in _END
        body = sequence(alternative[begins:len(alternative) - ends])
        options.append(("" if begins else anywhere) + body + ("" if ends else anywhere))
    return rx.alt(options)


# ---- schemas ----------------------------------------------------------------------------------------------


def _json_types(value) -> set[str]:
    if value is None:
        return {"null"}
    if isinstance(value, bool):
        return {"boolean"}
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return {"integer", "number"}
    return {float: {"number"}, str: {"string"}, list: {"array"}, dict: {"object"}}.get(type(value), set())


def _type_list(value, path: str) -> list[str]:
    types = [value] if isinstance(value, str) else value
    if not isinstance(types, list) or not types or any(t not in _TYPES for t in types):
        raise SchemaError(f"{path}: 'type' must be one of {', '.join(_TYPES)} or a non-empty list of them, "
                          f"got {value!r}")
    return list(dict.fromkeys(types))


def _count(schema: dict, key: str, path: str) -> int | None:
    value = schema.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise SchemaError(f"{path}: {key!r} must be a non-negative integer, got {value!r}")
    return value


def _bound(schema: dict, key: str, path: str) -> list[Fraction]:
    """[the bound] or []; exact (Fraction), so that 2.5 or 1e20 round the right way."""
    if key not in schema:
        return []
    value = schema[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SchemaError(f"{path}: {key!r} must be a finite number (draft 2020-12), got {value!r}")
    return [Fraction(value)]


def _siblings(schema: dict, key: str) -> dict:
    """The keywords beside `key`, to merge into what `key` leads to ($id stays behind: it is root-only)."""
    return {k: v for k, v in schema.items() if k not in (key, "$id")}


def _merge(a, b, path: str) -> dict:
    """One schema that means both (allOf); refuses what it cannot merge exactly."""
    if a is False or b is False:
        raise SchemaError(f"{path}: the false schema matches nothing")
    a, b = ({} if s is True else s for s in (a, b))
    for s in (a, b):
        if not isinstance(s, dict):
            raise SchemaError(f"{path}: a schema must be an object or a boolean, got {s!r}")
    for x, y in ((a, b), (b, a)):  # x's additionalProperties would judge y's properties, which merging loses
        declared = x.get("properties", {})
        undeclared = [name for name in y.get("properties", {}) if name not in declared]
        if x.get("additionalProperties", True) is not True and undeclared:
            raise SchemaError(f"{path}: cannot merge schemas where one's 'additionalProperties' applies to "
                              "another's 'properties'")
    merged = dict(a)
    for key, value in b.items():
        if key not in merged or merged[key] == value or key in _NON_CONSTRAINTS:
            merged.setdefault(key, value)
        elif key == "required":
            merged[key] = merged[key] + [name for name in value if name not in merged[key]]
        elif key == "properties":
            ours = merged[key]  # a property in both must satisfy both
            merged[key] = ours | {n: s if n not in ours or ours[n] == s else {"allOf": [ours[n], s]}
                                  for n, s in value.items()}
        elif key == "type":
            x, y = _type_list(merged[key], path), _type_list(value, path)
            types = [t for t in x if t in y or (t == "integer" and "number" in y)]
            types += [t for t in y if t == "integer" and "number" in x and t not in types]
            if not types:
                raise SchemaError(f"{path}: no value has both type {merged[key]!r} and type {value!r}")
            merged[key] = types
        else:
            raise SchemaError(f"{path}: cannot merge two different {key!r} (allOf, or keywords beside $ref/anyOf)")
    return merged


class _Compiler:
    def __init__(self, root, whitespace: str):
        self.root = root
        self.ws = whitespace
        self.refs: tuple[str, ...] = ()  # the $refs being expanded, outermost first: a repeat is a cycle
        self.any_values: dict[int, str] = {}

    def compile(self, schema, path: str) -> str:
        if schema is True:
            return self.any_value(ANY_VALUE_DEPTH)
        if schema is False:
            raise SchemaError(f"{path}: the false schema matches nothing")
        if not isinstance(schema, dict):
            raise SchemaError(f"{path}: a schema must be an object or a boolean, got {schema!r}")
        for key in schema:
            if key not in SUPPORTED:
                raise SchemaError(f"{path}: unsupported keyword {key!r} (supported: {', '.join(SUPPORTED)})")
        if "$id" in schema and path != "schema":
            raise SchemaError(f"{path}: '$id' is only supported at the root")
        if "$ref" in schema:
            return self.ref(schema, path)
        if "allOf" in schema:
            merged = _siblings(schema, "allOf")
            for i, part in enumerate(self.subschemas(schema, "allOf", path)):
                merged = _merge(merged, part, f"{path}.allOf[{i}]")
            return self.compile(merged, path)
        if "anyOf" in schema:
            rest = _siblings(schema, "anyOf")
            branches = self.subschemas(schema, "anyOf", path)
            return rx.alt([self.compile(_merge(rest, b, f"{path}.anyOf[{i}]"), f"{path}.anyOf[{i}]")
                         for i, b in enumerate(branches)])
        if "enum" in schema or "const" in schema:
            return self.enum(schema, path)
        if "type" in schema:
            types = _type_list(schema["type"], path)
        else:
            types = list(dict.fromkeys(_KEYWORD_TYPES[k] for k in schema if k in _KEYWORD_TYPES))
            if not types:
                return self.any_value(ANY_VALUE_DEPTH)
        return rx.alt([getattr(self, t)(schema, path) for t in types])

    @staticmethod
    def subschemas(schema: dict, key: str, path: str) -> list:
        value = schema[key]
        if not isinstance(value, list) or not value:
            raise SchemaError(f"{path}: {key!r} must be a non-empty list of schemas")
        return value

    def ref(self, schema: dict, path: str) -> str:
        ref = schema["$ref"]
        match = re.fullmatch(r"#/(\$defs|definitions)/([^/]+)", ref) if isinstance(ref, str) else None
        if match is None:
            raise SchemaError(f"{path}: unsupported $ref {ref!r} "
                              "(only local '#/$defs/<name>' or '#/definitions/<name>')")
        defs, name = match[1], match[2].replace("~1", "/").replace("~0", "~")  # JSON pointer escapes
        if not isinstance(self.root, dict) or name not in self.root.get(defs, {}):
            raise SchemaError(f"{path}: $ref {ref!r} points to nothing")
        if ref in self.refs:
            cycle = " -> ".join(self.refs[self.refs.index(ref):] + (ref,))
            raise SchemaError(f"{path}: recursive $ref cycle {cycle}")
        target = self.root[defs][name]
        rest = _siblings(schema, "$ref")
        outer, self.refs = self.refs, self.refs + (ref,)
        try:
            return self.compile(_merge(target, rest, path) if rest else target, f"schema.{defs}.{name}")
        finally:
            self.refs = outer

    def enum(self, schema: dict, path: str) -> str:
        values = schema.get("enum", [schema.get("const")])
        if not isinstance(values, list) or not values:
            raise SchemaError(f"{path}: 'enum' must be a non-empty list")
        if "const" in schema:
            const = _dumps(schema["const"], path, sort_keys=True)
            values = [v for v in values if _dumps(v, path, sort_keys=True) == const]
        others = [k for k in schema if k not in _NON_CONSTRAINTS | {"enum", "const", "type"}]
        if others:
            raise SchemaError(f"{path}: {others[0]!r} cannot be combined with 'enum'/'const' (only 'type' can)")
        if "type" in schema:
            types = _type_list(schema["type"], path)
            values = [v for v in values if _json_types(v) & set(types)]
        if not values:
            raise SchemaError(f"{path}: no 'enum'/'const' value satisfies the schema")
        # longest first (see rx.natural_regex): enum [1, 12] must not lose 12 at the top level
        return rx.alt(sorted((rx.literal(_dumps(v, path)) for v in values), key=len, reverse=True))

    def any_value(self, depth: int) -> str:
        """Any JSON value whose containers nest at most `depth` deep."""
        if depth not in self.any_values:
            options = list(rx.SCALARS)
            if depth > 0:
                inner = self.any_value(depth - 1)
                options += [self.object_regex([], (rx.STRING, inner)), self.array_regex(inner, 0, None)]
            self.any_values[depth] = rx.alt(options)
        return self.any_values[depth]

    def object_regex(self, members: list[tuple[str, bool]], extra: tuple[str, str] | None) -> str:
        """{...} with `members` ((regex of '"name":value', required) in order), then, if `extra` is
        (name regex, value regex), any number of extra members. Built left to right tracking whether a
        member precedes (so the next takes a comma), which keeps each member regex in at most two copies."""
        sep = f"{self.ws},{self.ws}"
        previous, may_be_empty = None, True  # regex of a non-empty run of members so far; whether none is allowed
        for regex, required in members:
            if previous is None:
                current = regex
            elif required:
                current = (rx.repeat(previous + sep, 0, 1) if may_be_empty else previous + sep) + regex
            else:
                current = previous + rx.repeat(sep + regex, 0, 1)
                current = rx.alt([current, regex]) if may_be_empty else current
            previous, may_be_empty = current, may_be_empty and not required
        if extra is not None:
            name, value = extra
            pair = f"{name}{self.ws}:{self.ws}{value}"
            head = pair if previous is None else rx.alt([previous, pair]) if may_be_empty else previous
            previous = head + rx.repeat(sep + pair, 0, None)
        if previous is None:
            return rf"\{{{self.ws}\}}"
        body = rx.repeat(previous + self.ws, 0, 1) if may_be_empty else previous + self.ws
        return rf"\{{{self.ws}{body}\}}"

    def array_regex(self, item: str, lo: int, hi: int | None) -> str:
        if hi == 0:
            return rf"\[{self.ws}\]"
        items = item + rx.repeat(f"{self.ws},{self.ws}{item}", max(lo - 1, 0), None if hi is None else hi - 1)
        return rf"\[{self.ws}" + (rx.repeat(items + self.ws, 0, 1) if lo == 0 else items + self.ws) + r"\]"

    # one method per JSON type, called by name

    def object(self, schema: dict, path: str) -> str:
        properties = schema.get("properties", {})
        required = schema.get("required", [])
        if not isinstance(properties, dict):
            raise SchemaError(f"{path}: 'properties' must be an object")
        if not isinstance(required, list) or any(not isinstance(n, str) for n in required):
            raise SchemaError(f"{path}: 'required' must be a list of strings")
        for name in required:
            if name not in properties:
                raise SchemaError(f"{path}: required property {name!r} is not in 'properties'")
        members = []
        for name, subschema in properties.items():
            if subschema is False and name not in required:
                continue  # may never be present
            value = self.compile(subschema, f"{path}.properties.{name}")
            members.append((f'"{rx.literal(_dumps(name, path)[1:-1])}"{self.ws}:{self.ws}{value}', name in required))
        additional = schema.get("additionalProperties", not properties)
        extra = None
        if additional is not False:
            value = self.compile(additional, f"{path}.additionalProperties")
            extra = (_string_except(list(properties)), value)
        return self.object_regex(members, extra)

    def array(self, schema: dict, path: str) -> str:
        if isinstance(schema.get("items"), list):
            raise SchemaError(f"{path}: 'items' as a list (tuple validation) is unsupported")
        lo, hi = _count(schema, "minItems", path) or 0, _count(schema, "maxItems", path)
        if hi is not None and lo > hi:
            raise SchemaError(f"{path}: 'minItems' {lo} exceeds 'maxItems' {hi}")
        return self.array_regex(self.compile(schema.get("items", True), f"{path}.items"), lo, hi)

    def string(self, schema: dict, path: str) -> str:
        given = [k for k in ("pattern", "format", "minLength", "maxLength") if k in schema]
        if len(given) > 1 and given[0] in ("pattern", "format"):
            raise SchemaError(f"{path}: {given[0]!r} cannot be combined with {given[1]!r} "
                              "(a regex cannot intersect them)")
        if "format" in schema:
            if schema["format"] not in rx.FORMATS:
                raise SchemaError(f"{path}: unsupported format {schema['format']!r} (supported: {', '.join(rx.FORMATS)})")
            return f'"{rx.FORMATS[schema["format"]][0]}"'
        if "pattern" in schema:
            return f'"{_pattern_regex(schema["pattern"], path)}"'
        lo, hi = _count(schema, "minLength", path) or 0, _count(schema, "maxLength", path)
        if hi is not None and lo > hi:
            raise SchemaError(f"{path}: 'minLength' {lo} exceeds 'maxLength' {hi}")
        return f'"{rx.repeat(rx.STRING_CHAR, lo, hi)}"'

    def integer(self, schema: dict, path: str) -> str:
        lows = [math.ceil(b) for b in _bound(schema, "minimum", path)]
        lows += [math.floor(b) + 1 for b in _bound(schema, "exclusiveMinimum", path)]
        highs = [math.floor(b) for b in _bound(schema, "maximum", path)]
        highs += [math.ceil(b) - 1 for b in _bound(schema, "exclusiveMaximum", path)]
        lo, hi = max(lows, default=None), min(highs, default=None)
        if lo is not None and hi is not None and lo > hi:
            raise SchemaError(f"{path}: no integer lies within the bounds")
        return rx.integer_regex(lo, hi)

    def number(self, schema: dict, path: str) -> str:
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if key in schema:
                raise SchemaError(f"{path}: {key!r} on type 'number' is unsupported "
                                  "(bounds are only supported on integers)")
        return rx.NUMBER

    def boolean(self, schema: dict, path: str) -> str:
        return "(?:true|false)"

    def null(self, schema: dict, path: str) -> str:
        return "null"


def _dumps(value, path: str, sort_keys: bool = False) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False, sort_keys=sort_keys)
    except (TypeError, ValueError) as e:
        raise SchemaError(f"{path}: {value!r} is not a JSON value ({e})") from None


def _string_except(names: list[str]) -> str:
    """A JSON string (json.dumps' escapes) that decodes to none of `names`: an extra member must not repeat
    a declared one (json.loads keeps the last of duplicate names, which would escape the declared schema).
    Walks the trie of the names: at each node, stop (if no name ends there), leave the trie with a
    character no name continues with, or follow a name's next character."""
    if not names:
        return rx.STRING
    trie: dict = {}
    for name in names:
        node = trie
        for c in name:
            node = node.setdefault(c, {})
        node[None] = {}  # a name ends here

    def rest(node: dict) -> str:
        children = [c for c in node if c is not None]
        leave = rx.encode_chars(rx.complement([(ord(c), ord(c)) for c in children])) + rx.repeat(rx.CANONICAL_CHAR, 0, None)
        body = rx.alt([leave] + [rx.encode_chars([(ord(c), ord(c))]) + rest(node[c]) for c in children])
        return body if None in node else rx.repeat(body, 0, 1)

    return f'"{rest(trie)}"'


def schema_to_regex(schema: dict | bool, *, whitespace: str = "compact") -> str:
    """A regex (Rust regex / Python re syntax) matching JSON documents valid under `schema`, within the
    supported subset (module docstring); raises SchemaError naming the first unsupported keyword and its path.

    whitespace: "compact" (none between tokens) or "flexible" (up to 16 of space, tab, newline, carriage
    return wherever JSON allows whitespace inside the document).
    """
    if whitespace not in WHITESPACE:
        raise ValueError(f"whitespace must be one of {', '.join(WHITESPACE)}, got {whitespace!r}")
    return _Compiler(schema, WHITESPACE[whitespace]).compile(schema, "schema")


if schema_to_regex.__doc__ is not None:  # None under python -OO
    schema_to_regex.__doc__ += "\nSupported keywords:\n\n" + supported_markdown() + "\n"
