"""Hugging Face tokenizer folders behind our Tokenizer interface: tokenizer.json (against transformers'
AutoTokenizer), tokenizer.model (against SentencePiece), and chat templates (against apply_chat_template)."""

import json
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
jinja2 = pytest.importorskip("jinja2")

from research.hf_tokenizer import HFTokenizer, is_hf_tokenizer  # noqa: E402
from research.tokenizer import load_tokenizer  # noqa: E402

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello, world! Héllo wörld, naïve café.",
         "  two  spaces and\nnew lines\n\n", "numbers 12345 and symbols #@!?", "the theme of these theories"]
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
# Exercises what transformers' renderer sets up: trim/lstrip blocks, loop controls, raise_exception, a tojson
# that keeps non-ASCII, {% generation %}, the special tokens as variables and add_generation_prompt.
CHAT_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
    {% if loop.index > 8 %}{% break %}{% endif %}
<|im_start|>{{ message['role'] }}
{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{% endgeneration %}
{% else %}{{ message['content'] }}
{% endif %}
    {% if message.meta is defined %}
meta={{ message.meta | tojson }}
    {% endif %}
<|im_end|>
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Héllo, who are you?", "meta": {"lang": "français", "n": 1}},
            {"role": "assistant", "content": "A fox.", "meta": None},
            {"role": "user", "content": "the theme?"}]


def save_tiny_tokenizer(folder: Path, vocab_size: int = 120) -> None:
    """A byte-level BPE (a bos-adding post-processor, chat markers as special tokens) saved by transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS * 4, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                           show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hf_tokenizer")
    save_tiny_tokenizer(folder)
    return folder


def test_tokenizer_json_matches_transformers(tokenizer_dir):
    ours, hf = load_tokenizer(tokenizer_dir), transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    assert isinstance(ours, HFTokenizer) and is_hf_tokenizer(tokenizer_dir)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 0)
    assert ours.vocab_size == len(hf)
    assert ours.prompt_prefix == [1] and ours.add_bos_default is True  # the bos HF adds
    for text in TEXTS:
        ids = ours.encode(text, add_bos=False)
        assert ids == hf.encode(text, add_special_tokens=False)
        assert ours.encode(text) == hf.encode(text) == [1, *ids]  # add_special_tokens=True: bos, no eos
        assert ours.encode(text, add_bos=True) == [1, *ids]
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True) == text
        assert ours.decode(ours.encode(text)) == text
        assert ours.decode([ours.bos_id, *ids, ours.eos_id, ours.pad_id]) == text
    assert ours.encode_batch(TEXTS) == [ours.encode(t) for t in TEXTS] == hf(TEXTS)["input_ids"]
    assert ours.encode_batch(TEXTS, add_bos=False) == [ours.encode(t, add_bos=False) for t in TEXTS]
    assert ours.encode_batch(TEXTS, add_bos=True) == ours.encode_batch(TEXTS)


def test_tokenizer_that_adds_no_bos(tmp_path):
    """A post-processor that adds nothing (Qwen2's): encode adds nothing, add_bos=True asks for bos anyway,
    and a tokenizer with no bos token at all says so."""
    save_tiny_tokenizer(tmp_path)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    data["post_processor"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    ours, hf = load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = TEXTS[0]
    assert ours.add_bos_default is False and ours.prompt_prefix == []
    assert ours.encode(text) == hf.encode(text) == hf.encode(text, add_special_tokens=False)
    assert ours.encode(text, add_bos=True) == [ours.bos_id, *ours.encode(text)] and ours.bos_id == 1
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("bos_token")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").unlink(missing_ok=True)
    no_bos = load_tokenizer(tmp_path)
    assert no_bos.encode(text) == ours.encode(text)
    with pytest.raises(ValueError, match=r"^add_bos=True: the tokenizer in .* has no bos token$"):
        no_bos.encode(text, add_bos=True)
    no_bos.save(tmp_path / "saved")  # as a converted run keeps it: still no bos after a round trip
    saved = load_tokenizer(tmp_path / "saved")
    assert saved.bos_id == saved.eos_id == 2 and saved.encode(text) == ours.encode(text)
    with pytest.raises(ValueError, match=r"has no bos token$"):
        saved.encode(text, add_bos=True)


def test_chat_template_matches_apply_chat_template(tokenizer_dir):
    ours, hf = HFTokenizer.load(tokenizer_dir), transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    for add in (False, True):
        text = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add)
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=add) == text
        assert 'meta={"lang": "français", "n": 1}' in text and text.startswith("<s>")
    ids = hf.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ours.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True) == list(ids)
    assert list(ids).count(ours.bos_id) == 1  # the template's bos, not a second one from encode
    bad = MESSAGES + [{"role": "tool", "content": "x"}]
    with pytest.raises(jinja2.TemplateError, match="unknown role tool"):
        ours.apply_chat_template(bad)
    with pytest.raises(jinja2.TemplateError, match="unknown role tool"):
        hf.apply_chat_template(bad, tokenize=False)


def test_save_then_load_is_the_same_tokenizer(tokenizer_dir, tmp_path):
    ours = HFTokenizer.load(tokenizer_dir)
    ours.save(tmp_path / "copy")
    again = load_tokenizer(tmp_path / "copy")
    assert again.encode_batch(TEXTS) == ours.encode_batch(TEXTS)
    assert (again.bos_id, again.eos_id, again.pad_id, again.chat_template) == (
        ours.bos_id, ours.eos_id, ours.pad_id, ours.chat_template)


def test_sentencepiece_tokenizer_model(tmp_path):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS * 8), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=320, model_type="unigram", byte_fallback=True, minloglevel=2,
                                   hard_vocab_limit=False)
    (tmp_path / "tokenizer.vocab").unlink()
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": {"content": "</s>"}}')
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    ours = load_tokenizer(tmp_path)
    assert isinstance(ours, HFTokenizer) and ours.vocab_size == sp.get_piece_size()
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 2)  # no pad token: eos pads
    assert ours.prompt_prefix == [1]  # add_bos_token defaults to true, as in transformers' LlamaTokenizer
    for text in TEXTS[:2] + ["zebra ünïcode"]:  # the last is outside the training text: byte fallback
        assert ours.encode(text, add_bos=False) == sp.encode(text)
        assert ours.encode(text) == sp.encode(text, add_bos=True) == [1, *sp.encode(text)]
        assert ours.decode(ours.encode(text)) == sp.decode(sp.encode(text))
    assert ours.encode_batch(TEXTS) == [[1, *ids] for ids in sp.encode(TEXTS)]
    assert ours.decode(ours.encode(TEXTS[0])) == TEXTS[0]
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>", '
                                                    '"add_bos_token": false}')
    assert load_tokenizer(tmp_path).encode(TEXTS[0]) == sp.encode(TEXTS[0])
