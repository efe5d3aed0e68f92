"""picochat's BPE tokenizer <-> a Hugging Face fast tokenizer (`tokenizer.json`) + chat template.

Export: our tiktoken-style byte-level BPE (rank table + split regex + 9 specials after the ranks)
becomes (through transformers' TikTokenConverter) Split(regex, isolated) -> ByteLevel(no regex) ->
BPE(vocab = ranks, ignore_merges=True). The vocab spells each token's bytes with GPT-2's
byte->unicode map; the merge list holds, for every token, each split into two existing tokens,
ordered by the token's rank. tiktoken merges the adjacent pair whose concatenation has the lowest
rank; listing every such pair at that rank makes HF's "lowest merge index first" pick the same
pair. ignore_merges=True mirrors tiktoken's "a whole regex piece that is itself a token is one
token" shortcut. The chat template prints exactly the token stream `Tokenizer.render_conversation`
builds (the two known differences: docs/export.md).

Import: the reverse for a `tokenizer.json` of that shape (what transformers' nanochat converter
ships). Anything else is refused with the reason; the result is verified by encoding sample text.
"""
from __future__ import annotations

import json
from pathlib import Path

from picochat.common import PicochatError
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer

BOS = "<|bos|>"
EOS = "<|assistant_end|>"  # a chat reply ends here; generation_config also stops at <|bos|>

# The template mirrors tokenizer.render_conversation / _messages: BOS, an optional system
# message folded into the first user message with a blank line, strictly alternating turns,
# assistant content as a string or a list of {"type": text|python|python_output, "text": ...}.
CHAT_TEMPLATE = (
    "{%- set sys = messages[0]['role'] == 'system' -%}"
    "{%- if sys and (messages | length < 2 or messages[1]['role'] != 'user') -%}"
    "{{- raise_exception('a system message must be followed by a user message') -}}"
    "{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- set i = loop.index0 - (1 if sys else 0) -%}"
    "{%- if sys and loop.first -%}"
    "{%- elif message['role'] == 'user' and i % 2 == 0 -%}"
    "{{- '<|user_start|>' -}}"
    "{%- if sys and i == 0 -%}{{- messages[0]['content'] + '\n\n' -}}{%- endif -%}"
    "{{- message['content'] + '<|user_end|>' -}}"
    "{%- elif message['role'] == 'assistant' and i % 2 == 1 -%}"
    "{{- '<|assistant_start|>' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] == 'python' -%}{{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}"
    "{%- elif part['type'] == 'python_output' -%}{{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}"
    "{%- else -%}{{- raise_exception('assistant content parts must have type text, python or python_output') -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|assistant_end|>' -}}"
    "{%- else -%}"
    "{{- raise_exception('roles must alternate user, assistant, user, ... (after an optional system message)') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}"
)

# Text the export and import checks encode both ways: scripts, emoji, digits, whitespace runs,
# contractions, code, and special-token look-alikes (as plain text).
SAMPLE_TEXTS = [
    "Hello, world! It's 2025; we'll see 1234567 numbers.\n\n  Indented\tand\ttabbed   spaces ",
    "Ünïcödé façade naïve coöperate — “quotes” ‘and’ … ellipses",
    "日本語のテキストと中文文本, 한국어 텍스트, русский текст, ελληνικά, עברית, العربية",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷🇯🇵 zwj\u200d and combining e\u0301",
    "def f(x):\n    return x ** 2  # relu²\r\n\r\nprint(f(3))\n",
    "<|bos|> not a special token here <|assistant_end|>",
    "   leading spaces, trailing newline\n\n\n",
    "I'M SHOUTING, you're whispering; they'd've DONE it",
]


def build_fast_tokenizer(tok: Tokenizer):
    """A `tokenizers.Tokenizer` that encodes any text exactly as `tok` does, with the specials at
    the same ids; plain `encode(text)` prepends <|bos|> like `picochat sample` does."""
    from tokenizers import AddedToken, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class Converter(TikTokenConverter):  # transformers' tiktoken -> BPE conversion, as described above
        def load_tiktoken_bpe(self, _):
            # the Tokenizer keeps its rank table private; reading it here (rather than re-parsing
            # tokenizer.tiktoken) keeps one source of truth for what picochat encodes
            return tok._ranks

    fast = Converter(pattern=tok._pattern).converted()
    fast.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    for s in SPECIAL_TOKENS:
        if fast.token_to_id(s) != tok.encode_special(s):
            raise PicochatError(f"special token {s} got id {fast.token_to_id(s)} in the HF tokenizer, "
                                f"expected {tok.encode_special(s)}")
    fast.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.bos_token_id)])
    return fast


def save_hf_tokenizer(tok: Tokenizer, out_dir: Path, model_max_length: int) -> None:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into out_dir."""
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(
        tokenizer_object=build_fast_tokenizer(tok), bos_token=BOS, eos_token=EOS, pad_token=BOS,
        chat_template=CHAT_TEMPLATE, model_max_length=model_max_length, padding_side="left",
        clean_up_tokenization_spaces=False)
    hf.save_pretrained(str(out_dir))
    # transformers 5 records its internal class name; the alias every version and transformers.js know
    cfg_file = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def check_hf_tokenizer(tok: Tokenizer, hf_tok, conversations: list) -> list[str]:
    """Differences between `hf_tok` (a transformers tokenizer) and `tok` on the sample texts and
    chat conversations; an empty list means they agree."""
    problems = []
    for text in SAMPLE_TEXTS:
        ours = tok.encode(text)
        theirs = hf_tok(text, add_special_tokens=False)["input_ids"]
        if "<|" not in text and theirs != ours:  # specials inside text differ by design (docs/export.md)
            problems.append(f"text {text[:30]!r}: HF ids {theirs[:12]}... != picochat {ours[:12]}...")
        if hf_tok.decode(ours) != tok.decode(ours):
            problems.append(f"decode of {text[:30]!r} differs")
    for conv in conversations:
        ours, _ = tok.render_conversation(conv)
        if hf_tok.apply_chat_template(conv, return_dict=True)["input_ids"] != ours:
            problems.append(f"chat template ids differ from render_conversation for {conv[0]['content'][:30]!r}")
    return problems


# --------------------------------------------------------------------------- import


def tokenizer_from_hf(path: Path) -> Tokenizer:
    """Convert `path/tokenizer.json` (byte-level BPE with picochat/nanochat's nine specials) into a
    picochat Tokenizer, or raise PicochatError saying what cannot be represented."""
    f = path / "tokenizer.json"
    if not f.is_file():
        pkl = (path / "tokenizer.pkl").is_file()  # native nanochat ships a pickled tiktoken Encoding
        raise PicochatError(f"{path} has no tokenizer.json; picochat imports only a fast byte-level BPE tokenizer" + (
            "; its tokenizer.pkl is not loaded because unpickling runs arbitrary code: convert the "
            "checkpoint with transformers' convert_nanochat_checkpoints.py first" if pkl else ""))
    try:
        spec = json.loads(f.read_text(encoding="utf-8"))
        model = spec["model"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PicochatError(f"cannot read {f} ({type(e).__name__}: {e})") from None

    def refuse(why: str) -> PicochatError:
        return PicochatError(f"cannot import the tokenizer in {f}: {why}; picochat needs tiktoken-style "
                             "byte-level BPE with its nine chat special tokens (as nanochat's)")

    if model.get("type") != "BPE":
        raise refuse(f"model type is {model.get('type')!r}, not BPE")
    if spec.get("normalizer"):
        raise refuse(f"it has a normalizer ({spec['normalizer'].get('type')})")
    pattern = _split_pattern(spec.get("pre_tokenizer"))
    if pattern is None:
        raise refuse("its pre-tokenizer is not Split(regex) followed by ByteLevel(use_regex=false)")
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    decode = {c: b for b, c in bytes_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    for s, i in model["vocab"].items():
        try:
            ranks[bytes(decode[c] for c in s)] = int(i)
        except KeyError:
            raise refuse(f"vocab entry {s!r} is not byte-level") from None
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    expected = {s: len(ranks) + i for i, s in enumerate(SPECIAL_TOKENS)}
    if specials != expected:
        extra = sorted(set(specials) - set(expected))
        wrong = [s for s in SPECIAL_TOKENS if specials.get(s) != expected[s]]
        raise refuse(f"added tokens differ (unexpected {extra[:5]}, missing or misplaced {wrong[:5]})")
    try:
        tok = Tokenizer(ranks, pattern)
    except ValueError as e:
        raise refuse(str(e)) from None
    except Exception as e:  # tiktoken rejects a regex its engine cannot compile  # noqa: BLE001
        raise refuse(f"its split regex does not compile for tiktoken ({e})") from None
    from tokenizers import Tokenizer as FastTokenizer
    fast = FastTokenizer.from_file(str(f))
    for text in SAMPLE_TEXTS:
        if "<|" not in text and fast.encode(text, add_special_tokens=False).ids != tok.encode(text):
            raise refuse(f"its merges do not encode like rank-ordered BPE (sample {text[:30]!r} differs)")
    return tok


def _split_pattern(pre) -> str | None:
    """The regex of a Sequence[Split(Regex, isolated), ByteLevel(use_regex=False)] pre-tokenizer."""
    if not pre or pre.get("type") != "Sequence" or len(pre.get("pretokenizers", [])) != 2:
        return None
    split, byte_level = pre["pretokenizers"]
    if (split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert")
            or "Regex" not in split.get("pattern", {})):
        return None
    if byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex") or byte_level.get("add_prefix_space"):
        return None
    return split["pattern"]["Regex"]

