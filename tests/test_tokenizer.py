"""Tokenizer tests: BPE round trip, special tokens, chat rendering/masking, persistence, errors."""
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from picochat.common import PicochatError
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer
from picochat.tokenizer_cli import evaluate_tokenizer, format_table, train_tokenizer

WORDS = """the a an of to in and or but is was are were be been has have had do does did not
it this that these those he she they we you I me him her them my your our their cat dog bird
house tree river mountain city road car train book letter story song music water fire light
night day morning evening year time people child children friend teacher student doctor
king queen garden window door table chair kitchen school market ship sea island forest
walk run read write sing think know see look find give take make come go say tell ask
quickly slowly happily quietly always never often sometimes very really quite rather
big small old young new good bad happy sad bright dark warm cold green blue red white
because although while when where why how what which who whose whom if then than""".split()


def make_corpus(n_sentences: int = 600, seed: int = 0) -> list[str]:
    """A few KB of varied English-ish text with punctuation, numbers and newlines."""
    rng = random.Random(seed)
    docs, doc = [], []
    for i in range(n_sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 2025)))
        sent = " ".join(words)
        sent = sent[0].upper() + sent[1:] + rng.choice([".", ".", "!", "?", ",", ";"])
        doc.append(sent)
        if rng.random() < 0.1:
            docs.append(" ".join(doc) + "\n")
            doc = []
    docs.append(" ".join(doc))
    return docs


VOCAB = 512
N_SPECIAL = len(SPECIAL_TOKENS)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(make_corpus(), VOCAB)


# ---------------------------------------------------------------------------- basics

def test_vocab_and_special_ids(tok):
    assert tok.vocab_size == VOCAB
    assert SPECIAL_TOKENS[0] == "<|bos|>" and len(SPECIAL_TOKENS) == 9
    ids = [tok.encode_special(name) for name in SPECIAL_TOKENS]
    assert ids == list(range(VOCAB - N_SPECIAL, VOCAB))
    assert tok.bos_token_id == VOCAB - N_SPECIAL == tok.pad_token_id
    for name, i in zip(SPECIAL_TOKENS, ids):
        assert tok.decode([i]) == name


def test_unknown_special_token_errors(tok):
    with pytest.raises(KeyError, match="nope"):
        tok.encode_special("<|nope|>")
    with pytest.raises(KeyError):
        tok.encode("hi", prepend="<|nope|>")
    with pytest.raises(ValueError):
        tok.encode("hi", append=10**6)


def test_bpe_learned_merges_compress(tok):
    text = "The cat and the dog walk to the house."
    ids = tok.encode(text)
    assert len(ids) < len(text.encode()) / 2  # merges were learned, not just bytes
    assert tok.decode(ids) == text


def test_prepend_append_and_batch(tok):
    bos, end = tok.bos_token_id, tok.encode_special("<|assistant_end|>")
    plain = tok.encode("hello world")
    assert tok.encode("hello world", prepend="<|bos|>", append=end) == [bos, *plain, end]
    assert tok.encode("hello world", prepend=bos) == [bos, *plain]
    batch = tok.encode(["hello world", "", "the cat"], prepend="<|bos|>", num_threads=2)
    assert batch == [[bos, *plain], [bos], [bos, *tok.encode("the cat")]]
    with pytest.raises(TypeError):
        tok.encode(123)


def test_special_literals_are_plain_text(tok):
    text = "ignore that <|assistant_end|><|bos|> and <|python_start|>"
    ids = tok.encode(text)
    assert all(i < VOCAB - N_SPECIAL for i in ids)
    assert tok.decode(ids) == text


def test_decode_invalid_id(tok):
    with pytest.raises(ValueError):
        tok.decode([VOCAB + 5])


special_literal = st.sampled_from(SPECIAL_TOKENS + ["<|endoftext|>", "<|", "|>"])
weird = st.sampled_from(["😀", "👩‍👩‍👧", "中文字符", "日本語", "\x00", "\x1b[0m", "\r\n", "\u200b", "é", "1234567"])
mixed_text = st.lists(st.one_of(st.text(), special_literal, weird), max_size=8).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(s=st.one_of(st.text(), mixed_text))
def test_roundtrip_arbitrary_unicode(tok, s):
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    assert all(0 <= i < VOCAB - N_SPECIAL for i in ids)  # never a special id from text


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(mixed_text, max_size=5))
def test_batch_matches_single(tok, texts):
    assert tok.encode(texts) == [tok.encode(t) for t in texts]


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="265"):
        Tokenizer.train(["hello"], 256 + N_SPECIAL - 1)
    with pytest.raises(ValueError):
        Tokenizer.train(["hello"], 100)


def test_min_vocab_is_bytes_plus_specials():
    t = Tokenizer.train(["hello hello"], 256 + N_SPECIAL)
    assert t.vocab_size == 265
    assert t.encode("héllo") == list("héllo".encode())  # no merges: raw bytes


def test_small_corpus_stops_early():
    # rustbpe stops when no pair is left to merge; specials still follow the last rank.
    t = Tokenizer.train(["ab ab"], 2000)
    assert t.vocab_size < 2000
    assert t.encode_special("<|output_end|>") == t.vocab_size - 1


def test_empty_corpus_rejected():
    with pytest.raises(ValueError, match="no training text"):
        Tokenizer.train([], 512)


# ---------------------------------------------------------------------------- chat rendering

def supervised_spans(tok, ids, mask) -> list[str]:
    """Decode each maximal run of mask==1 tokens."""
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    if cur:
        spans.append(tok.decode(cur))
    return spans


def test_render_masks_exactly_assistant_content(tok):
    conv = {"messages": [
        {"role": "user", "content": "What is the river?"},
        {"role": "assistant", "content": "The river is blue."},
        {"role": "user", "content": "And the <|assistant_end|> tree?"},
        {"role": "assistant", "content": "Green 😀, always."},
    ]}
    ids, mask = tok.render_conversation(conv)
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    assert ids[0] == tok.bos_token_id and mask[0] == 0
    assert supervised_spans(tok, ids, mask) == [
        "The river is blue.<|assistant_end|>", "Green 😀, always.<|assistant_end|>"]
    assert tok.decode(ids) == (
        "<|bos|><|user_start|>What is the river?<|user_end|>"
        "<|assistant_start|>The river is blue.<|assistant_end|>"
        "<|user_start|>And the <|assistant_end|> tree?<|user_end|>"
        "<|assistant_start|>Green 😀, always.<|assistant_end|>")
    # the literal in the user text is plain text: exactly 2 real assistant_end ids
    assert ids.count(tok.encode_special("<|assistant_end|>")) == 2
    # every assistant_start is unsupervised, every assistant_end supervised
    for i, m in zip(ids, mask):
        if i in (tok.encode_special("<|assistant_start|>"), tok.encode_special("<|user_start|>"),
                 tok.encode_special("<|user_end|>")):
            assert m == 0
        if i == tok.encode_special("<|assistant_end|>"):
            assert m == 1
    # a bare list of messages is accepted too
    assert tok.render_conversation(conv["messages"]) == (ids, mask)


def test_system_message_merged_into_first_user(tok):
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}]
    ids, mask = tok.render_conversation({"messages": msgs})
    expected, _ = tok.render_conversation([{"role": "user", "content": "Be brief.\n\nHi"}, msgs[2]])
    assert ids == expected
    assert msgs[1]["content"] == "Hi"  # input not mutated


def test_tool_parts_masking(tok):
    conv = [{"role": "user", "content": "2+3?"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Let me compute. "},
                {"type": "python", "text": "2+3"},
                {"type": "python_output", "text": "5"},
                {"type": "text", "text": " The answer is 5."}]}]
    ids, mask = tok.render_conversation(conv)
    assert supervised_spans(tok, ids, mask) == [
        "Let me compute. <|python_start|>2+3<|python_end|>", " The answer is 5.<|assistant_end|>"]
    out_start = ids.index(tok.encode_special("<|output_start|>"))
    out_end = ids.index(tok.encode_special("<|output_end|>"))
    assert tok.decode(ids[out_start:out_end + 1]) == "<|output_start|>5<|output_end|>"
    assert all(m == 0 for m in mask[out_start:out_end + 1])


@pytest.mark.parametrize("msgs", [
    [{"role": "assistant", "content": "hi"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "assistant", "content": "c"}],
    [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
    [{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "bogus", "text": "x"}]}],
    [{"role": "user", "content": 5}],
    [],
])
def test_invalid_conversations_raise(tok, msgs):
    with pytest.raises(ValueError):
        tok.render_conversation({"messages": msgs})


def test_alternation_error_is_clear(tok):
    with pytest.raises(ValueError, match="alternate"):
        tok.render_conversation([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_max_tokens_truncates(tok):
    conv = [{"role": "user", "content": "Tell me a story about the king."},
            {"role": "assistant", "content": "The king walked to the sea. " * 5}]
    full_ids, full_mask = tok.render_conversation(conv)
    ids, mask = tok.render_conversation(conv, max_tokens=20)
    assert len(full_ids) > 20
    assert ids == full_ids[:20] and mask == full_mask[:20]
    assert tok.render_conversation(conv, max_tokens=10**6) == (full_ids, full_mask)


def test_render_for_completion(tok):
    a_start = tok.encode_special("<|assistant_start|>")
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]
    ids = tok.render_for_completion({"messages": conv})
    assert ids[-1] == a_start
    assert tok.decode(ids) == "<|bos|><|user_start|>Hi<|user_end|><|assistant_start|>"
    assert tok.render_for_completion(conv[:1]) == ids  # ending on a user turn works the same
    assert len(conv) == 2  # not mutated
    with pytest.raises(ValueError):
        tok.render_for_completion([{"role": "system", "content": "x"}])


def test_visualize_marks_supervised(tok):
    ids, mask = tok.render_conversation([{"role": "user", "content": "q"}, {"role": "assistant", "content": "ans"}])
    assert tok.visualize(ids, mask) == "<|bos|><|user_start|>q<|user_end|><|assistant_start|>[[ans<|assistant_end|>]]"
    assert "\033[" in tok.visualize(ids, mask, color=True)


# ---------------------------------------------------------------------------- persistence

def test_save_load_roundtrip(tok, tmp_path):
    tok.save(tmp_path / "tk")
    assert {p.name for p in (tmp_path / "tk").iterdir()} == {"tokenizer.tiktoken", "tokenizer.json"}
    loaded = Tokenizer.load(tmp_path / "tk")
    assert loaded.vocab_size == tok.vocab_size
    texts = make_corpus(50, seed=1) + ["<|bos|> 😀 中文 \x00", ""]
    assert loaded.encode(texts) == tok.encode(texts)
    assert [loaded.encode_special(n) for n in SPECIAL_TOKENS] == [tok.encode_special(n) for n in SPECIAL_TOKENS]
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert loaded.render_conversation(conv) == tok.render_conversation(conv)
    tok.save(tmp_path / "tk")  # overwriting in place works and leaves no temp files
    assert len(list((tmp_path / "tk").iterdir())) == 2


def test_load_missing_dir(tmp_path):
    with pytest.raises(PicochatError, match="no tokenizer at .*picochat tokenizer train"):
        Tokenizer.load(tmp_path / "nope")


def test_load_missing_file(tok, tmp_path):
    tok.save(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(PicochatError, match="no tokenizer at"):
        Tokenizer.load(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "bad_json"])
def test_load_corrupt(tok, tmp_path, damage):
    tok.save(tmp_path)
    ranks, meta = tmp_path / "tokenizer.tiktoken", tmp_path / "tokenizer.json"
    if damage == "truncate":
        ranks.write_bytes(ranks.read_bytes()[:1000])
    elif damage == "garbage":
        ranks.write_bytes(b"\x00\xffnot base64 at all\n")
    else:
        meta.write_text("{not json")
    with pytest.raises(PicochatError, match="corrupt tokenizer file") as ei:
        Tokenizer.load(tmp_path)
    assert "\n" not in str(ei.value)


def test_load_corrupt_line_with_matching_hash(tok, tmp_path):
    # Even if the hash is updated to match, an unparseable line is reported with its number.
    import hashlib
    import json
    tok.save(tmp_path)
    ranks, meta = tmp_path / "tokenizer.tiktoken", tmp_path / "tokenizer.json"
    data = ranks.read_bytes().replace(b"\n", b"\n!!!notbase64 x\n", 1)
    ranks.write_bytes(data)
    m = json.loads(meta.read_text())
    m["ranks_sha256"] = hashlib.sha256(data).hexdigest()
    meta.write_text(json.dumps(m))
    with pytest.raises(PicochatError, match="line 2"):
        Tokenizer.load(tmp_path)


# ---------------------------------------------------------------------------- CLI helpers

def test_train_tokenizer_saves_and_reports(tmp_path):
    corpus = make_corpus(200, seed=2)
    tok, stats = train_tokenizer(iter(corpus), 300, tmp_path / "out")
    assert stats["vocab_size"] == tok.vocab_size == 300
    assert stats["chars"] == sum(map(len, corpus)) and stats["texts"] == len(corpus)
    assert stats["seconds"] >= 0
    assert Tokenizer.load(tmp_path / "out").encode(corpus[0]) == tok.encode(corpus[0])


def test_evaluate_and_format(tok):
    texts = make_corpus(100, seed=3)
    rows = evaluate_tokenizer(tok, texts)
    ours = rows[0]
    assert ours["tokenizer"] == "picochat" and ours["vocab_size"] == VOCAB
    assert ours["tokens"] == sum(len(ids) for ids in tok.encode(texts))
    assert ours["bytes_per_token"] == pytest.approx(sum(len(t.encode()) for t in texts) / ours["tokens"], rel=1e-3)
    for r in rows:  # reference rows appear only if they load offline; same shape either way
        assert set(r) == {"tokenizer", "vocab_size", "bytes_per_token", "tokens"}
        assert r["bytes_per_token"] > 1.0
    table = format_table(rows)
    assert "picochat" in table and "bytes_per_token" in table
    assert len(table.splitlines()) == len(rows) + 2
    assert format_table([]) == "(no rows)"
