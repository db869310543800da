"""JSON's lexical regexes, for decoding/json_schema.py: literals and repetition in the syntax both Rust's
regex crate and Python's `re` read alike, sets of code points and how JSON strings write them, the JSON
value tokens, the string formats, and exact digit-range regexes for bounded integers.
"""

from __future__ import annotations

# ---- regex building blocks -------------------------------------------------------------------------------

_META = set("\\.+*?()|[]{}^$#&-~")  # special to Rust or Python, in or out of classes; escaping is fine in both


def _char(cp: int) -> str:
    """One code point as a regex (inside or outside a class)."""
    c = chr(cp)
    if c in _META:
        return "\\" + c
    if 0x20 <= cp < 0x7F:
        return c
    if cp <= 0xFF:
        return f"\\x{cp:02x}"
    return f"\\u{cp:04x}" if cp <= 0xFFFF else f"\\U{cp:08x}"


def literal(text: str) -> str:
    return "".join(_char(ord(c)) for c in text)


def _is_atom(regex: str) -> bool:
    """Whether a quantifier may follow `regex` directly: one character, one escape, one class or one group."""
    if len(regex) == 1 or (len(regex) == 2 and regex[0] == "\\"):
        return True
    if regex[0] not in "([":
        return False
    depth, in_class, i = 0, False, 0
    while i < len(regex):
        c = regex[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            in_class = c != "]"  # we never nest classes: a "[" inside one is escaped
        elif c == "[":
            in_class = True
        else:
            depth += {"(": 1, ")": -1}.get(c, 0)
        if depth == 0 and not in_class and i < len(regex) - 1:
            return False  # the first class or group ends before the regex does
        i += 1
    return True


def alt(options: list[str]) -> str:
    options = list(dict.fromkeys(options))
    return options[0] if len(options) == 1 else "(?:" + "|".join(options) + ")"


def repeat(regex: str, lo: int, hi: int | None) -> str:
    """`regex` repeated lo..hi times (hi None: unbounded)."""
    if hi == 0:
        return ""
    if (lo, hi) == (1, 1):
        return regex
    quantifier = {(0, None): "*", (1, None): "+", (0, 1): "?"}.get((lo, hi))
    if quantifier is None:
        quantifier = f"{{{lo}}}" if lo == hi else f"{{{lo},}}" if hi is None else f"{{{lo},{hi}}}"
    return (regex if _is_atom(regex) else f"(?:{regex})") + quantifier


# ---- sets of code points, and how JSON writes them inside strings ----------------------------------------

UNIVERSE = [(0, 0xD7FF), (0xE000, 0x10FFFF)]  # Unicode scalar values: what UTF-8 (and Rust's regex) can carry
_MUST_ESCAPE = [(0, 0x1F), (0x22, 0x22), (0x5C, 0x5C)]  # control characters, '"' and '\'
_SHORT_ESCAPES = {0x22: '"', 0x5C: "\\", 0x08: "b", 0x09: "t", 0x0A: "n", 0x0C: "f", 0x0D: "r"}


def normalize(ranges) -> list[tuple[int, int]]:
    merged = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def intersect(a, b) -> list[tuple[int, int]]:
    pairs = ((max(lo1, lo2), min(hi1, hi2)) for lo1, hi1 in a for lo2, hi2 in b)
    return normalize((lo, hi) for lo, hi in pairs if lo <= hi)


def complement(ranges) -> list[tuple[int, int]]:
    gaps, start = [], 0
    for lo, hi in normalize(ranges):
        if lo > start:
            gaps.append((start, lo - 1))
        start = hi + 1
    return intersect(gaps + [(start, 0x10FFFF)], UNIVERSE)


def _char_class(ranges) -> str:
    """A regex for one code point of the (non-empty) `ranges`: the character itself, [...] or [^...]."""
    if len(ranges) == 1 and ranges[0][0] == ranges[0][1]:
        return _char(ranges[0][0])

    def items(rs):
        return "".join(_char(lo) + ("" if lo == hi else "-" * (hi > lo + 1) + _char(hi)) for lo, hi in rs)

    rest = complement(ranges)
    return f"[^{items(rest)}]" if rest and len(rest) < len(ranges) else f"[{items(ranges)}]"


def encode_chars(ranges) -> str:
    """A regex for one character of `ranges` (non-empty) as json.dumps(ensure_ascii=False) writes it in a string."""
    ranges = intersect(ranges, UNIVERSE)
    options = []
    plain = intersect(ranges, complement(_MUST_ESCAPE))
    if plain:
        options.append(_char_class(plain))
    escaped = [cp for lo, hi in intersect(ranges, _MUST_ESCAPE) for cp in range(lo, hi + 1)]
    short = [cp for cp in escaped if cp in _SHORT_ESCAPES]
    if short:
        options.append(r"\\" + _char_class(normalize((ord(_SHORT_ESCAPES[cp]),) * 2 for cp in short)))
    others = [cp for cp in escaped if cp not in _SHORT_ESCAPES]
    if others:
        options.append(r"\\u00" + alt([f"{cp:02x}" for cp in others]))
    assert options, "no characters to encode"
    return alt(options)


# ---- JSON tokens ------------------------------------------------------------------------------------------

# One character of a JSON string, any way JSON may write it: a plain character, a short escape, a \u escape
# of a non-surrogate, or a surrogate pair (one character, as json.loads and so jsonschema count it).
STRING_CHAR = (r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u(?:[0-9a-cA-Ce-fE-F][0-9a-fA-F]{3}|[dD][0-7][0-9a-fA-F]{2})'
                r"|\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2})")
STRING = f'"{STRING_CHAR}*"'
CANONICAL_CHAR = encode_chars(UNIVERSE)  # one character as json.dumps(ensure_ascii=False) writes it
NUMBER = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+\-]?[0-9]+)?"
SCALARS = [STRING, NUMBER, "true", "false", "null"]

_YEAR = r"(?:[0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)"  # 0001-9999, as Python's datetime
_LEAP_YEAR = r"(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_MONTH_DAY = (r"(?:(?:0[13578]|1[02])\-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)\-(?:0[1-9]|[12][0-9]|30)"
              r"|02\-(?:0[1-9]|1[0-9]|2[0-8]))")
_DATE = rf"(?:{_YEAR}\-{_MONTH_DAY}|{_LEAP_YEAR}\-02\-29)"
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,9})?(?:Z|[+\-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_ATEXT = r"[0-9A-Za-z!\#$%\&'*+/=?^_`{|}\~\-]"
_LABEL = r"[0-9A-Za-z](?:[0-9A-Za-z\-]*[0-9A-Za-z])?"
FORMATS = {  # format -> (regex of the string's content, what it accepts)
    "date": (_DATE, "RFC 3339 full-date YYYY-MM-DD, years 0001-9999, calendar-exact (month lengths, Gregorian "
                    "leap years)"),
    "time": (_TIME, "RFC 3339 full-time HH:MM:SS, optional 1-9 fraction digits, then Z or +HH:MM/-HH:MM; "
                    "no leap second (Python's datetime has none), upper-case Z only"),
    "date-time": (rf"{_DATE}T{_TIME}", "date, upper-case T, time"),
    "email": (rf"{_ATEXT}+(?:\.{_ATEXT}+)*@{_LABEL}(?:\.{_LABEL})+",
              "RFC 5321 dot-atom local part @ a domain of two or more ASCII labels (no quoted local parts, no IP "
              "literals, no length limits)"),
    "uuid": (r"[0-9a-f]{8}\-[0-9a-f]{4}\-[0-9a-f]{4}\-[0-9a-f]{4}\-[0-9a-f]{12}",
             "8-4-4-4-12 lower-case hex digits, any version (RFC 9562 writes lower case)"),
}


def integer_regex(lo: int | None = None, hi: int | None = None) -> str:
    """The integers n with lo <= n <= hi (None: unbounded), in JSON's decimal form."""
    if lo is None and hi is None:
        return "(?:0|-?[1-9][0-9]*)"
    options = []
    if lo is None or lo < 0:  # negatives: "-" then the magnitudes max(1, -hi) .. -lo
        neg_hi = -1 if hi is None else min(hi, -1)
        if lo is None or lo <= neg_hi:
            options.append("-" + natural_regex(-neg_hi, None if lo is None else -lo))
    if hi is None or hi >= 0:
        options.append(natural_regex(0 if lo is None else max(lo, 0), hi))
    return alt(options)


def natural_regex(lo: int, hi: int | None) -> str:
    """The naturals lo..hi (hi None: unbounded), without leading zeros: one same-length range per digit count,
    longest first (the module docstring says why)."""
    if hi is None:  # anything longer than lo, then up to the largest number as long as lo
        digits = len(str(lo))
        return alt([f"[1-9][0-9]{{{digits},}}", natural_regex(lo, 10**digits - 1)])
    options = []
    for digits in range(len(str(hi)), len(str(lo)) - 1, -1):
        first = 0 if digits == 1 else 10 ** (digits - 1)
        options.append(_same_length_regex(str(max(lo, first)), str(min(hi, 10**digits - 1))))
    return alt(options)


def _same_length_regex(lo: str, hi: str) -> str:
    """The decimal strings lo..hi (lo <= hi, same length), by their first digit."""
    if lo == hi:
        return lo
    if lo[0] == hi[0]:
        return lo[0] + _same_length_regex(lo[1:], hi[1:])
    n = len(lo) - 1
    # first digits whose every continuation is in range; lo[0] and hi[0] only if lo/hi are ...000 / ...999
    first = int(lo[0]) + (lo[1:] != "0" * n)
    last = int(hi[0]) - (hi[1:] != "9" * n)
    options = []
    if first > int(lo[0]):
        options.append(lo[0] + _same_length_regex(lo[1:], "9" * n))
    if first <= last:
        digit = str(first) if first == last else f"[{first}-{last}]"
        options.append(digit + repeat("[0-9]", n, n))
    if last < int(hi[0]):
        options.append(hi[0] + _same_length_regex("0" * n, hi[1:]))
    return alt(options)
