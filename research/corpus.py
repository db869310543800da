"""The embedded default corpus: a few MB of varied text, generated procedurally.

Nothing is shipped or downloaded. The text comes from small grammars over inline word lists,
seeded with `random.Random`, because that makes it:

- deterministic: byte-identical on every machine (pinned by CORPUS_SHA256);
- free of downloads and licensing questions, and keeps the repository small;
- tunable: genres, vocabulary and the invented world of towns, people and species can be
  changed to study how structure in the data affects learning.

Documents are separated by a blank line ("\\n\\n") and never contain one. Genres: short stories,
encyclopedia-style facts, question/answer pairs, arithmetic, dialogues, key: value records and
CSV tables, lists, Python-like code and a multilingual glossary (multi-byte UTF-8). The world's
facts are drawn once per seed and reused by every genre, so they agree across documents and
there is real structure to learn.

Only `random()`, `randrange`, `choice` and `shuffle` of `random.Random` are used (stable across
platforms and Python >= 3.11), and only tuples and lists are iterated, never sets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import random
import tempfile

CORPUS_SHA256 = "aae792779dc81693e1886cee64e9c486d8cc090f039b67d332e058636f885cb7"

# --- Word lists ----------------------------------------------------------------------------------

FEMALE = ("Alice", "Zoë", "Maria", "Chloé", "Ingrid", "Amélie", "Nadia", "Lena", "Sofía", "Hana",
          "Ruth", "Mei", "Aisha", "Greta", "Inês", "Yuki")
MALE = ("Bob", "José", "Omar", "Lars", "Mateo", "Björn", "Tomás", "Kenji", "Felix", "Ivan", "Hugo",
        "Ravi", "Samuel", "Jörg", "Luca", "Emil")
SYLLABLES = ("vel", "mo", "ra", "ash", "ka", "lin", "dor", "sen", "tha", "bri", "gol", "fen", "ri",
             "no", "va", "zé", "lö", "mar", "tu", "qua", "ost", "el", "an", "ber", "cor", "dru",
             "hal", "is", "jun", "kor", "len", "mir", "nor", "pel", "sar", "tor", "ul", "wen",
             "yar", "zan")
ROLES = ("baker", "fisher", "teacher", "farmer", "sailor", "painter", "doctor", "miller", "weaver",
         "carpenter", "gardener", "potter", "librarian", "shepherd", "smith", "clockmaker")
ADJECTIVES = ("small", "old", "quiet", "busy", "brave", "curious", "kind", "tired", "clever", "shy",
              "cheerful", "careful")
COLOURS = ("red", "blue", "green", "yellow", "white", "black", "silver", "brown", "grey", "golden",
           "orange", "purple")
OBJECTS = ("key", "box", "letter", "lamp", "map", "coin", "bell", "book", "basket", "shell", "ring",
           "feather", "stone", "kite", "cup")
LANDMARKS = ("bridge", "mill", "well", "market", "old oak", "chapel", "harbour", "gate", "library",
             "bakery", "hill", "lighthouse")
TIMES = ("morning", "evening", "afternoon", "night", "winter morning", "summer evening",
         "rainy day")
ANIMALS = ("dog", "cat", "goat", "crow", "horse", "fox", "owl", "rabbit")
FEELINGS = ("happy", "surprised", "worried", "curious", "proud", "excited")
CONTAINERS = ("bag", "pocket", "basket", "coat")
PRODUCTS = ("copper bells", "blue cheese", "woollen cloth", "river salt", "glass beads",
            "apple cider", "clay pots", "paper lanterns", "smoked fish", "honey cakes",
            "iron nails", "linen rope")
GOODS = ("apple", "pear", "egg", "loaf", "candle", "lemon", "fig", "plum", "onion", "cabbage")
KINDS = ("beetle", "moth", "heron", "fox", "carp", "lizard", "finch", "toad", "hare", "snail")
HABITATS = ("marshes", "pine forests", "river banks", "high meadows", "rocky coasts",
            "old orchards")
DIETS = ("seeds", "small insects", "grass", "fish", "berries", "leaves")
WORKS = ("a map of the northern rivers", "a book on clockwork", "a study of marsh birds",
         "the great bridge of stone", "a cookbook of winter soups", "a new kind of loom",
         "a history of the salt trade", "songs about the sea")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
LANGUAGES = ("Greek", "Russian", "Japanese", "Korean", "Hindi")
# English word, then its translation in each of LANGUAGES.
GLOSSARY = (
    ("water", "νερό", "вода", "水", "물", "पानी"),
    ("house", "σπίτι", "дом", "家", "집", "घर"),
    ("sun", "ήλιος", "солнце", "太陽", "해", "सूरज"),
    ("bread", "ψωμί", "хлеб", "パン", "빵", "रोटी"),
    ("book", "βιβλίο", "книга", "本", "책", "किताब"),
    ("river", "ποτάμι", "река", "川", "강", "नदी"),
    ("cat", "γάτα", "кошка", "猫", "고양이", "बिल्ली"),
    ("friend", "φίλος", "друг", "友達", "친구", "दोस्त"),
    ("moon", "φεγγάρι", "луна", "月", "달", "चाँद"),
    ("tree", "δέντρο", "дерево", "木", "나무", "पेड़"),
    ("fire", "φωτιά", "огонь", "火", "불", "आग"),
    ("bird", "πουλί", "птица", "鳥", "새", "चिड़िया"),
)


# --- The invented world: drawn once per seed, shared by every genre ---------------------------


@dataclasses.dataclass(frozen=True)
class Town:
    name: str
    river: str
    region: str
    population: int
    founded: int
    known_for: str
    elevation_m: int


@dataclasses.dataclass(frozen=True)
class Person:
    first: str
    last: str
    female: bool
    born: int
    hometown: Town
    profession: str
    work: str

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


@dataclasses.dataclass(frozen=True)
class Species:
    name: str
    kind: str
    habitat: str
    colour: str
    length_cm: int
    diet: str


@dataclasses.dataclass(frozen=True)
class World:
    towns: tuple[Town, ...]
    people: tuple[Person, ...]
    species: tuple[Species, ...]


def _pronouns(female: bool) -> dict[str, str]:
    he, him, his = ("she", "her", "her") if female else ("he", "him", "his")
    return {"he": he, "him": him, "his": his, "He": he.capitalize(), "His": his.capitalize()}


def _person(rng: random.Random) -> tuple[str, dict[str, str]]:
    """A random first name and its pronouns."""
    female = rng.random() < 0.5
    return rng.choice(FEMALE if female else MALE), _pronouns(female)


def _other(rng: random.Random, name: str) -> str:
    """A random first name different from `name`."""
    other = rng.choice(FEMALE + MALE)
    while other == name:
        other = rng.choice(FEMALE + MALE)
    return other


def _invent_name(rng: random.Random, used: set[str], lo: int, hi: int) -> str:
    """A new capitalised name of lo..hi syllables; `used` is only tested, never iterated."""
    while True:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.randrange(lo, hi + 1))).capitalize()
        if name not in used:
            used.add(name)
            return name


def _make_world(rng: random.Random) -> World:
    used: set[str] = set()
    rivers = [_invent_name(rng, used, 1, 2) for _ in range(12)]
    regions = [_invent_name(rng, used, 2, 3) for _ in range(8)]
    towns = tuple(
        Town(_invent_name(rng, used, 2, 3), rng.choice(rivers), rng.choice(regions),
             rng.randrange(300, 90_000), rng.randrange(800, 1900), rng.choice(PRODUCTS),
             rng.randrange(5, 1500))
        for _ in range(60))
    people = []
    for _ in range(48):
        female = rng.random() < 0.5
        people.append(Person(rng.choice(FEMALE if female else MALE), _invent_name(rng, used, 2, 2),
                             female, rng.randrange(1700, 1990), rng.choice(towns),
                             rng.choice(ROLES), rng.choice(WORKS)))
    species = tuple(
        Species(_invent_name(rng, used, 2, 2), rng.choice(KINDS), rng.choice(HABITATS),
                rng.choice(COLOURS), rng.randrange(2, 120), rng.choice(DIETS))
        for _ in range(30))
    return World(towns, tuple(people), species)


# --- Genres: each returns one document with no blank line inside ------------------------------


def _story(rng: random.Random, world: World) -> str:
    name, p = _person(rng)
    friend, fp = _person(rng)
    while friend == name:
        friend, fp = _person(rng)
    town = rng.choice(world.towns)
    obj, colour, time = rng.choice(OBJECTS), rng.choice(COLOURS), rng.choice(TIMES)
    place, place2 = rng.choice(LANDMARKS), rng.choice(LANDMARKS)
    role, adj = rng.choice(ROLES), rng.choice(ADJECTIVES)
    s = [rng.choice((
        f"{name} was a {adj} {role} who lived in {town.name}.",
        f"Once there was a {adj} {role} named {name}. "
        f"{p['He']} lived in {town.name}, a town on the river {town.river}.",
        f"In the town of {town.name} lived a {role} called {name}.",
    ))]
    if rng.random() < 0.5:
        s.append(f"Every day {p['he']} walked to the {place}.")
    s.append(f"One {time}, {p['he']} found a {colour} {obj} near the {place}.")
    feeling = rng.choice(FEELINGS)
    s.append(rng.choice((
        f"{p['He']} felt {feeling}.",
        f"{name} was {feeling} — {p['he']} had never seen such a {obj} before.",
    )))
    if rng.random() < 0.4:
        s.append(f"On the way home, a {rng.choice(ANIMALS)} followed {p['him']}.")
    s.append(f"{p['He']} put the {obj} in {p['his']} {rng.choice(CONTAINERS)} and went to see "
             f"{friend}, the {rng.choice(ROLES)}.")
    s.append(rng.choice((f'"Look what I found," said {name}.',
                         f'"Where does this {obj} come from?" asked {name}.')))
    s.append(f'{friend} looked at the {colour} {obj}. "It belongs to the {place2}," '
             f"{fp['he']} said.")
    s.append(rng.choice((f"Together they took the {obj} back to the {place2}.",
                         f"{friend} kept the {obj} safe, and {name} went home.")))
    s.append(rng.choice((f"From that day on, {name} and {friend} were good friends.",
                         f"{name} never forgot that {time}.", "The end.")))
    return " ".join(s)


def _with_some(rng: random.Random, head: str, facts: list[str], least: int) -> str:
    """`head` followed by a random non-empty subset of `facts` in random order."""
    rng.shuffle(facts)
    return " ".join([head] + facts[:rng.randrange(least, len(facts) + 1)])


def _encyclopedia(rng: random.Random, world: World) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        t = rng.choice(world.towns)
        return _with_some(
            rng, f"The town of {t.name} lies on the river {t.river} in the {t.region} region.", [
                f"Its population is {t.population:,}.",
                f"{t.name} was founded in {t.founded}.",
                f"It is known for its {t.known_for}.",
                f"It lies {t.elevation_m} metres above sea level.",
            ], 2)
    if kind == 1:
        x = rng.choice(world.people)
        p = _pronouns(x.female)
        return _with_some(rng, f"{x.name} (born {x.born}) was a {x.profession} from "
                               f"{x.hometown.name}.", [
            f"{p['His']} hometown, {x.hometown.name}, is known for its {x.hometown.known_for}.",
            f"{x.last} is best known for {x.work}.",
            f"{p['His']} hometown lies on the river {x.hometown.river}.",
        ], 1)
    sp = rng.choice(world.species)
    return _with_some(rng, f"The {sp.name} {sp.kind} is a {sp.kind} found in {sp.habitat}.", [
        f"It is usually {sp.colour} and grows to about {sp.length_cm} cm.",
        f"It feeds mainly on {sp.diet}.",
        f"It is rarely seen outside the {sp.habitat}.",
    ], 1)


def _qa(rng: random.Random, world: World) -> str:
    lines = []
    for _ in range(rng.randrange(2, 6)):
        t, x, sp = rng.choice(world.towns), rng.choice(world.people), rng.choice(world.species)
        q, a = rng.choice((
            (f"What is the population of {t.name}?", f"{t.population:,}."),
            (f"Which river flows through {t.name}?", f"The {t.river}."),
            (f"When was {t.name} founded?", f"In {t.founded}."),
            (f"In which region is {t.name}?", f"The {t.region} region."),
            (f"When was {x.name} born?", f"In {x.born}."),
            (f"Where was {x.name} born?", f"In {x.hometown.name}."),
            (f"What was {x.name}'s profession?", f"{x.profession.capitalize()}."),
            (f"What does the {sp.name} {sp.kind} eat?", f"Mostly {sp.diet}."),
            (f"How long is the {sp.name} {sp.kind}?", f"About {sp.length_cm} cm."),
        ))
        lines += [f"Q: {q}", f"A: {a}"]
    return "\n".join(lines)


def _column_addition(a: int, b: int) -> str:
    """A worked digit-by-digit addition with carries."""
    places = ("Ones", "Tens", "Hundreds", "Thousands", "Ten-thousands")
    lines, carry, x, y = [f"Add {a} and {b}."], 0, a, b
    for place in places:
        if not (x or y or carry):
            break
        total = x % 10 + y % 10 + carry
        terms = f"{x % 10} + {y % 10}" + (f" + {carry}" if carry else "")
        carry = total // 10
        lines.append(f"{place}: {terms} = {total}, write {total % 10}"
                     + (", carry 1." if carry else "."))
        x, y = x // 10, y // 10
    lines.append(f"So {a} + {b} = {a + b}.")
    return "\n".join(lines)


def _arithmetic(rng: random.Random, world: World) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        lines = ["Practice:"]
        for _ in range(rng.randrange(4, 9)):
            op = rng.choice("+-*")
            if op == "*":
                a, b = rng.randrange(2, 13), rng.randrange(2, 13)
                lines.append(f"{a} {rng.choice(('*', '×'))} {b} = {a * b}")
            else:
                a, b = rng.randrange(1, 100), rng.randrange(1, 100)
                a, b = max(a, b), min(a, b)  # keeps differences non-negative
                lines.append(f"{a} {op} {b} = {a + b if op == '+' else a - b}")
        return "\n".join(lines)
    if kind == 1:
        return _column_addition(rng.randrange(10, 10_000), rng.randrange(10, 10_000))
    name, p = _person(rng)
    good, have = rng.choice(GOODS), rng.randrange(5, 30)
    s = [f"{name} has {have} {good}s."]
    for _ in range(rng.randrange(1, 4)):
        n = rng.randrange(2, 10)
        if rng.random() < 0.5 or n > have:
            s.append(f"{p['He']} buys {n} more. Now {p['he']} has {have} + {n} = {have + n} "
                     f"{good}s.")
            have += n
        else:
            s.append(f"{p['He']} gives {n} to {_other(rng, name)}. Now {p['he']} has "
                     f"{have} - {n} = {have - n} {good}s.")
            have -= n
    s.append(f"In the end {name} has {have} {good}s.")
    return " ".join(s)


def _dialogue(rng: random.Random, world: World) -> str:
    a = rng.choice(FEMALE + MALE)
    b = _other(rng, a)
    kind = rng.randrange(3)
    if kind == 0:
        t = rng.choice(world.towns)
        turns = ((a, f"Good {rng.choice(('morning', 'evening'))}, {b}. Where are you going?"),
                 (b, f"To {t.name}. I want to buy some {t.known_for}."),
                 (a, f"Is that the town on the river {t.river}?"),
                 (b, f"Yes — about {t.population:,} people live there."),
                 (a, "Safe travels!"))
    elif kind == 1:
        good, price, n = rng.choice(GOODS), rng.randrange(1, 10), rng.randrange(2, 10)
        turns = ((a, f"How much is one {good}?"),
                 (b, f"{price} coins."),
                 (a, f"I'll take {n}, please."),
                 (b, f"That is {n} × {price} = {n * price} coins."),
                 (a, "Here you are."),
                 (b, f"Thank you, {a}!"))
    else:
        x = rng.choice(world.people)
        p = _pronouns(x.female)
        turns = ((a, f"Have you heard of {x.name}?"),
                 (b, f"The {x.profession} from {x.hometown.name}? {p['He']} was born in {x.born}."),
                 (a, f"Yes! {p['He']} is known for {x.work}."),
                 (b, "I should read more about that."))
    return "\n".join(f"{who}: {text}" for who, text in turns)


def _record(rng: random.Random, world: World) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        t = rng.choice(world.towns)
        return "\n".join((f"name: {t.name}", "type: town", f"river: {t.river}",
                          f"region: {t.region}", f"population: {t.population}",
                          f"founded: {t.founded}", f"known_for: {t.known_for}"))
    if kind == 1:
        x = rng.choice(world.people)
        return "\n".join((f"name: {x.name}", "type: person", f"born: {x.born}",
                          f"hometown: {x.hometown.name}", f"profession: {x.profession}",
                          f"known_for: {x.work}"))
    rows = ["name,river,region,population,founded"]
    for _ in range(rng.randrange(3, 8)):
        t = rng.choice(world.towns)
        rows.append(f"{t.name},{t.river},{t.region},{t.population},{t.founded}")
    return "\n".join(rows)


def _listing(rng: random.Random, world: World) -> str:
    if rng.random() < 0.5:
        lines, total = [f"Shopping list for {rng.choice(FEMALE + MALE)}:"], 0
        for _ in range(rng.randrange(3, 7)):
            n = rng.randrange(2, 10)
            lines.append(f"- {n} {rng.choice(GOODS)}s")
            total += n
        return "\n".join(lines + [f"Total: {total} items"])
    tasks = [f"visit the {rng.choice(LANDMARKS)}",
             f"write a letter to {rng.choice(FEMALE + MALE)}",
             f"buy {rng.randrange(2, 10)} {rng.choice(GOODS)}s",
             f"feed the {rng.choice(ANIMALS)}",
             f"take the train to {rng.choice(world.towns).name}"]
    rng.shuffle(tasks)
    tasks = tasks[:rng.randrange(2, len(tasks) + 1)]
    return "\n".join([f"Things to do on {rng.choice(WEEKDAYS)}:"]
                     + [f"{i}. {task[0].upper()}{task[1:]}" for i, task in enumerate(tasks, 1)])


def _code(rng: random.Random, world: World) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        good = rng.choice(GOODS)
        xs = [rng.randrange(1, 20) for _ in range(rng.randrange(2, 6))]
        return "\n".join((f"def total_{good}s(counts):",
                          f'    """Return the total number of {good}s."""',
                          "    total = 0",
                          "    for n in counts:",
                          "        total += n",
                          "    return total",
                          f"print(total_{good}s({xs}))  # {sum(xs)}"))
    if kind == 1:
        t = rng.choice(world.towns)
        return "\n".join(("town = {",
                          f'    "name": "{t.name}",',
                          f'    "river": "{t.river}",',
                          f'    "population": {t.population},',
                          "}",
                          f'print(town["population"])  # {t.population}'))
    if kind == 2:
        k, n = rng.randrange(2, 10), rng.randrange(3, 8)
        values = [i * k for i in range(n)]
        return "\n".join((f"values = [i * {k} for i in range({n})]",
                          f"print(values)  # {values}",
                          f"print(sum(values))  # {sum(values)}"))
    sp = rng.choice(world.species)
    cls, var = sp.kind.capitalize(), sp.name.lower()
    return "\n".join((f"class {cls}:",
                      "    def __init__(self, name, length_cm):",
                      "        self.name = name",
                      "        self.length_cm = length_cm",
                      f'{var} = {cls}("{sp.name}", {sp.length_cm})',
                      f"print({var}.length_cm)  # {sp.length_cm}"))


def _glossary(rng: random.Random, world: World) -> str:
    row = rng.choice(GLOSSARY)
    if rng.random() < 0.5:
        return "\n".join([f"English: {row[0]}"]
                         + [f"{lang}: {word}" for lang, word in zip(LANGUAGES, row[1:])])
    order = list(range(len(LANGUAGES)))
    rng.shuffle(order)
    i, j = order[:2]
    return (f"In {LANGUAGES[i]}, the word for “{row[0]}” is {row[i + 1]} — "
            f"in {LANGUAGES[j]}, {row[j + 1]}.")


# Repeats set the genre mix: stories and facts dominate, as in ordinary prose.
_GENRES = (_story, _story, _story, _encyclopedia, _encyclopedia, _qa, _arithmetic, _arithmetic,
           _dialogue, _dialogue, _record, _listing, _code, _glossary)


def generate_corpus(seed: int = 0, num_bytes: int = 4_000_000) -> str:
    """Generates documents joined by "\\n\\n", deterministically from `seed`.

    Stops at the first document boundary at or after `num_bytes` UTF-8 bytes, so a shorter corpus
    is a prefix of a longer one with the same seed.
    """
    if num_bytes <= 0:
        raise ValueError(f"num_bytes={num_bytes}: expected a positive integer")
    rng = random.Random(seed)
    world = _make_world(rng)
    docs, size = [], 0
    while size < num_bytes:
        docs.append(rng.choice(_GENRES)(rng, world))
        size += len(docs[-1].encode("utf-8")) + (2 if len(docs) > 1 else 0)  # + "\n\n"
    return "\n\n".join(docs)


def embedded_corpus_path(cache_dir: str | os.PathLike) -> pathlib.Path:
    """Returns `<cache_dir>/corpus/embedded-<sha[:12]>.txt`, writing the default corpus once."""
    path = pathlib.Path(cache_dir) / "corpus" / f"embedded-{CORPUS_SHA256[:12]}.txt"
    if path.exists():
        return path
    data = generate_corpus().encode("utf-8")
    digest = hashlib.sha256(data).hexdigest()
    if digest != CORPUS_SHA256:
        # The file name promises these exact bytes; never cache anything else under it.
        raise RuntimeError(f"generated corpus sha256 {digest} != CORPUS_SHA256 {CORPUS_SHA256}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Temp file + rename in the same directory: readers never see a partial file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".embedded-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
