"""Constrained decoding: the tables against a brute-force reference, the mask against the unconstrained
distribution, and every output of a random-weight model (the harshest adversary: it puts mass everywhere)
matching its pattern under greedy, sampling and beam search, several constraints in one batch."""

import itertools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoding.beam_search import BeamConfig, beam_search
from decoding.constraint import Budget, ConstraintError, compile_regex, constrain
from decoding.generate import generate
from decoding.sampling import make_sampler
from models.config import ModelConfig
from models.transformer import init_params, unbox

EOS, PAD = 2, 0
CFG = ModelConfig(vocab_size=320, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64, max_seq_len=96)


def byte_vocabulary(size: int = CFG.vocab_size, seed: int = 0) -> list[bytes | None]:
    """Specials (pad, bos, eos), every single byte (so partial UTF-8 pieces exist), then multi-byte tokens,
    some of them whole or split UTF-8 characters; the last ids stay unused (None), as in a padded vocab."""
    rng = np.random.default_rng(seed)
    vocab: list[bytes | None] = [None, None, None] + [bytes([b]) for b in range(256)]
    alphabet = list(b'0123456789-:.+@abcxyz "{},[]') + list("é日".encode())
    extra = {"é".encode(), "日".encode(), "日本".encode()}
    while len(extra) < size - len(vocab) - 4:
        extra.add(bytes(rng.choice(alphabet, rng.integers(2, 4))))
    return vocab + sorted(extra) + [None] * 4


VOCAB = byte_vocabulary()


def text_of(tokens, length) -> str:
    return b"".join(VOCAB[t] for t in tokens[:length] if t != EOS).decode("utf-8")


PATTERNS = [
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}",  # a date
    r"[a-c]+@[xyz]+\.(com|org)",  # an email-ish address
    r"[+-]?(0|[1-9][0-9]{0,3})(\.[0-9]{1,3})?",  # a signed decimal
    r"(red|green|blue)",  # an enum
    r"\{\"a\":\[([0-9]+(,[0-9]+){0,3})?\],\"b\":(true|false)\}",  # an object with an array
    r"(yes|no)( maybe)?",  # an optional part
    r"[a-z]{2,5}",  # length bounds
    r"é{1,3}日本?",  # multi-byte characters, split or whole tokens
    r"\"([^\"\\\\]|\\\\.){0,6}\"",  # a JSON string of at most 6 characters
    r"(ab)*c",  # a loop
    r"[0-9]{1,2}:[0-5][0-9]",  # a time
    r"null|\[(null|true)(,(null|true)){1,2}\]",  # minItems/maxItems-like repetition
]


@pytest.fixture(scope="module")
def automata():
    return [compile_regex(p, VOCAB, CFG.vocab_size, eos_id=EOS) for p in PATTERNS]


@pytest.fixture(scope="module")
def params():
    return unbox(init_params(CFG, jax.random.key(0), seq_len=8))


def test_tables_agree_with_a_brute_force_reference():
    """Every token sequence up to length 3 over a small vocabulary: "complete" iff re.fullmatch, "invalid"
    iff no extension of up to 4 more tokens ever matches (dead states are pruned, so "prefix" always can)."""
    vocab = [None, None, None, b"1", b"2", b"12", b"-", b"-1", b"a", b"\xc3", b"\xa9", "é".encode()]
    pattern = r"(1|2)+-?1é?"
    automaton = compile_regex(pattern, vocab, len(vocab), eos_id=EOS)
    tokens = range(3, len(vocab))

    def matches(seq) -> bool:
        try:
            return re.fullmatch(pattern, b"".join(vocab[t] for t in seq).decode("utf-8")) is not None
        except UnicodeDecodeError:
            return False

    extensions = [e for n in range(5) for e in itertools.product(tokens, repeat=n)]
    for n in range(4):
        for seq in itertools.product(tokens, repeat=n):
            verdict = automaton.check(list(seq), [EOS])
            assert (verdict == "complete") == matches(seq), (seq, verdict)
            viable = any(matches(seq + e) for e in extensions)
            assert (verdict != "invalid") == viable, (seq, verdict)
            assert automaton.check([*seq, EOS], [EOS]) == ("complete" if matches(seq) else "invalid")


def test_mask_keeps_the_unconstrained_distribution_renormalised(automata):
    processor = constrain(automata, (EOS,), which=np.arange(len(automata)))
    state = processor.init(jnp.zeros((len(automata), 1), jnp.int32), jnp.ones(len(automata), jnp.int32),
                           CFG.vocab_size)
    logits = jax.random.normal(jax.random.key(1), (len(automata), CFG.vocab_size)) * 3
    for _ in range(3):  # the first steps of each automaton, along its most likely allowed tokens
        masked = processor.process(state, logits, jnp.zeros((), jnp.int32))
        allowed = np.asarray(processor.allowed(state))
        assert allowed.any(axis=1).all()
        p, q = np.asarray(jax.nn.softmax(masked)), np.asarray(jax.nn.softmax(logits))
        expected = np.where(allowed, q, 0) / np.sum(np.where(allowed, q, 0), axis=1, keepdims=True)
        np.testing.assert_allclose(p, expected, rtol=1e-5, atol=1e-7)
        assert (p[~allowed] == 0).all()
        state = processor.update(state, jnp.argmax(masked, axis=1).astype(jnp.int32))


def check_outputs(out, automata, which, samples):
    tokens, lengths, complete = map(np.asarray, (out.tokens, out.lengths, out.complete))
    for b, k in enumerate(which):
        for n in range(samples):
            verdict = automata[k].check(tokens[b, n, :lengths[b, n]].tolist(), [EOS])
            assert complete[b, n] == (verdict == "complete"), (PATTERNS[k], b, n, verdict)  # device == host
            assert verdict != "invalid"
            if complete[b, n]:
                assert re.fullmatch(PATTERNS[k], text_of(tokens[b, n], lengths[b, n])), PATTERNS[k]
    return complete


def prompts(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Ragged prompts: row b has 1 + b % 3 tokens."""
    lengths = 1 + np.arange(count) % 3
    prompt = np.where(np.arange(3)[None, :] < lengths[:, None], 40 + np.arange(count)[:, None] % 50, PAD)
    return prompt.astype(np.int32), lengths.astype(np.int32)


def test_sampling_200_outputs_per_constraint_all_match(automata, params):
    """Twelve constraints in one batch (rows carry different automata), 200 samples each, top-k and
    top-p on top of the mask: every output matches, and nearly all complete within 48 tokens."""
    which = np.arange(len(automata))
    prompt, lengths = prompts(len(which))
    processor = constrain(automata, (EOS,), which=which)
    for kind, extra in (("sample", {}), ("sample", {"top_k": 20, "top_p": 0.9})):
        sampler, sampling = make_sampler(len(which), kind, temperature=1.0, **extra)
        out = generate(params, CFG, prompt, lengths, jax.random.key(3), max_new_tokens=48, sampler=sampler,
                       sampling=sampling, processors=(processor,), stop_tokens=(EOS,), pad_id=PAD, num_samples=200)
        complete = check_outputs(out, automata, which, 200)
        assert complete.mean() > 0.9, complete.mean(axis=1)


def test_greedy_and_beam_search_outputs_match(automata, params):
    which = np.arange(len(automata))
    prompt, lengths = prompts(len(which))
    processor = constrain(automata, (EOS,), which=which)
    out = generate(params, CFG, prompt, lengths, max_new_tokens=48, processors=(processor,), stop_tokens=(EOS,),
                   pad_id=PAD)
    check_outputs(out, automata, which, 1)
    out = beam_search(params, CFG, prompt, lengths, max_new_tokens=48, beam=BeamConfig(num_beams=4, num_return=4),
                      processors=(processor,), stop_tokens=(EOS,), pad_id=PAD)
    complete = check_outputs(out, automata, which, 4)
    # A beam may keep extending a loop ([a-c]+) past max_new_tokens: reported incomplete, never returned as valid.
    assert complete[:, 0].sum() >= len(which) - 2, complete


def test_an_unfinished_output_is_reported_incomplete(automata, params):
    date = automata[0]
    out = generate(params, CFG, *prompts(2), max_new_tokens=3, processors=(constrain([date], (EOS,)),),
                   stop_tokens=(EOS,), pad_id=PAD)
    assert not np.asarray(out.complete).any()  # 10 characters cannot fit in 3 single-byte... or 3-byte tokens
    for row in np.asarray(out.tokens)[:, 0]:
        assert date.check(row.tolist(), [EOS]) == "prefix"


@pytest.mark.parametrize("pattern, message", [
    ("a(", r"regex 'a\(': not a valid regular expression \(missing \), unterminated subpattern at position 1\)"),
    ("[z-a]", r"regex '\[z-a\]': not a valid regular expression \(bad character range z-a at position 1\)"),
    ("\u0100", r"regex 'Ā': the vocabulary cannot produce it \(.*"),
])
def test_bad_and_unrealisable_patterns_are_one_line(pattern, message):
    vocab = [None, None, None, b"a", b"b"]
    with pytest.raises(ConstraintError, match="^" + message + "$"):
        compile_regex(pattern, vocab, len(vocab), eos_id=EOS)


def test_over_budget_is_refused():
    with pytest.raises(ConstraintError, match=r"^regex '\[a-c\]\{0,300\}': 30\d automaton states, over the "
                                              r"budget of 100$"):
        compile_regex("[a-c]{0,300}", VOCAB, CFG.vocab_size, eos_id=EOS, budget=Budget(max_states=100))
    with pytest.raises(ConstraintError, match=r"over the budget of 100000 states and 0.0 MiB$"):
        compile_regex("[a-c]{0,30}", VOCAB, CFG.vocab_size, eos_id=EOS, budget=Budget(max_bytes=1000))


def test_compiled_automata_are_cached(tmp_path):
    first = compile_regex(PATTERNS[0], VOCAB, CFG.vocab_size, eos_id=EOS, cache_dir=tmp_path)
    again = compile_regex(PATTERNS[0], VOCAB, CFG.vocab_size, eos_id=EOS, cache_dir=tmp_path)
    assert not first.cached and again.cached and "read from the cache" in again.describe()
    for name in ("next_state", "token_class", "accepting"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    other = compile_regex(PATTERNS[0], VOCAB[:-1] + [b"q"], CFG.vocab_size, eos_id=EOS, cache_dir=tmp_path)
    assert not other.cached  # another vocabulary, another key
    for path in (tmp_path / "automata").iterdir():
        path.write_bytes(path.read_bytes()[:100])  # a damaged cache file is rebuilt, not trusted
    rebuilt = compile_regex(PATTERNS[0], VOCAB, CFG.vocab_size, eos_id=EOS, cache_dir=tmp_path)
    assert not rebuilt.cached
    np.testing.assert_array_equal(rebuilt.next_state, first.next_state)


SCHEMAS = [
    {"type": "object", "properties": {"id": {"type": "integer", "minimum": -50, "maximum": 50},
                                      "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1,
                                               "maxItems": 3}},
     "required": ["id"], "additionalProperties": False},  # optional property, bounded array of enums
    {"anyOf": [{"type": "boolean"}, {"type": "null"}, {"type": "string", "minLength": 2, "maxLength": 4}]},
    {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                         "required": ["x", "y"], "additionalProperties": False}},
     "type": "array", "items": {"$ref": "#/$defs/point"}, "maxItems": 2},  # $ref, nested objects in an array
    {"type": "object", "properties": {"when": {"type": "string", "format": "date"},
                                      "ok": {"type": "boolean"}}, "required": ["when", "ok"]},
]


def test_schema_outputs_validate_with_jsonschema(params):
    """200 samples per schema from the random-weight model: every complete output parses and validates."""
    jsonschema = pytest.importorskip("jsonschema")
    from decoding.json_schema import schema_to_regex

    automata = [compile_regex(schema_to_regex(s), VOCAB, CFG.vocab_size, eos_id=EOS) for s in SCHEMAS]
    which = np.arange(len(automata))
    sampler, sampling = make_sampler(len(which), "sample", temperature=1.0)
    out = generate(params, CFG, *prompts(len(which)), jax.random.key(5), max_new_tokens=64, sampler=sampler,
                   sampling=sampling, processors=(constrain(automata, (EOS,), which=which),), stop_tokens=(EOS,),
                   pad_id=PAD, num_samples=200)
    tokens, lengths, complete = map(np.asarray, (out.tokens, out.lengths, out.complete))
    for k, schema in enumerate(SCHEMAS):
        assert complete[k].mean() > 0.5, (k, complete[k].mean())
        for n in np.flatnonzero(complete[k]):
            jsonschema.validate(json.loads(text_of(tokens[k, n], lengths[k, n])), schema)
        for n in np.flatnonzero(~complete[k]):  # ran out of tokens: a valid prefix, never passed off as valid
            assert automata[k].check(tokens[k, n, :lengths[k, n]].tolist(), [EOS]) == "prefix"
