"""`picochat export hf` / `import hf`: transformers loads tiny trained MHA and GQA exports with
picochat's logits (max |diff| <= 1e-5 in fp32) and greedy text, the fast tokenizer and the chat
template give picochat's ids, MLA is refused by name, a failed check writes nothing, and
import -> export reproduces the directory (bit-equal weights, equal config and tokenizer)."""
import json
import random
import sys

import pytest
import torch

pytest.importorskip("transformers", minversion="5")
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from picochat import checkpoint as ck  # noqa: E402
from picochat.cli import main  # noqa: E402
from picochat.common import PicochatError, tokenizer_dir  # noqa: E402
from picochat.export import hf as hf_mod  # noqa: E402
from picochat.export.hf_tokenizer import SAMPLE_TEXTS, build_fast_tokenizer  # noqa: E402
from picochat.inference.engine import Engine  # noqa: E402
from picochat.model.config import GPTConfig, config_from_depth  # noqa: E402
from picochat.model.gpt import GPT  # noqa: E402
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer  # noqa: E402

TOL = 1e-5  # max |logit diff|, fp32, picochat vs transformers (measured: 0.0 on these models)
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}],
    [{"role": "user", "content": "What is 12*7?"},
     {"role": "assistant", "content": [{"type": "text", "text": "Using the tool: "},
                                       {"type": "python", "text": "12*7"},
                                       {"type": "python_output", "text": "84"},
                                       {"type": "text", "text": " so 84."}]},
     {"role": "user", "content": "And in words, with émphasis 😀?"},
     {"role": "assistant", "content": "Eighty-four!\n\n  Done."},
     {"role": "user", "content": "  spaces  and\ttabs\n"}],
]


def corpus() -> str:
    rng = random.Random(0)
    words = ("the cat sat on a mat and the dog ran to the big red house while birds sang in "
             "trees near the river 12 34 2025 Ünïcödé 日本語 😀 , . ! ?").split()
    return " ".join(rng.choice(words) for _ in range(3000))


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("home")
        mp.setenv("PICOCHAT_HOME", str(root))
        yield root


@pytest.fixture(scope="module")
def tok(home):
    t = Tokenizer.train([corpus()] + SAMPLE_TEXTS, vocab_size=400)
    t.save(tokenizer_dir())
    return t


def train_tiny(tok, tag, attention="mha", n_kv_head=None, steps=30, seed=0):
    """A depth-2 model after a few AdamW steps on real token windows, saved as `tag`."""
    torch.manual_seed(seed)
    cfg = config_from_depth(2, vocab_size=tok.vocab_size, sequence_len=64, aspect_ratio=32, head_dim=16,
                            attention=attention, n_kv_head=n_kv_head)
    model = GPT(cfg)
    model.init_weights()
    data = torch.tensor(tok.encode(corpus(), prepend=tok.bos_token_id))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 65, (8,), generator=g)
        batch = torch.stack([data[s:s + 65] for s in starts])
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    meta = {"stage": "sft", "tokenizer_vocab": tok.vocab_size, "val_bpb": 2.5, "tokens": steps * 512,
            "train_time": 1.0, "device": "cpu", "world_size": 1, "settings": {"seq_len": 64, "seed": seed}}
    ck.save_checkpoint(tag, steps, model.eval(), cfg, meta, state={"history": [{"step": steps, "loss": 4.25}]})
    return model.eval()


@pytest.fixture(scope="module")
def exported(tok, tmp_path_factory):
    """tag -> (picochat model, export dir) for a tiny MHA and a tiny GQA model."""
    out = {}
    for tag, kw in (("sft/mha", {}), ("sft/gqa", {"attention": "gqa", "n_kv_head": 2})):
        model = train_tiny(tok, tag, **kw)
        d = tmp_path_factory.mktemp("export") / tag.replace("/", "-")
        assert main(["export", "hf", "--model", tag, "--out", str(d)]) == 0
        out[tag] = (model, d)
    return out


def random_unicode(n, seed):
    rng = random.Random(seed)
    pool = ("abcXYZ019 \t\n\r'’-_.,;:!?()[]{}<>|/\\\"#@$%^&*+=~`éüßçøåñ日本語中文한국어русскийελληνικάעבריתالعربية"
            "हिन्दी😀👍🏽👨‍👩‍👧🇫🇷\u200d\u0301\u00a0\u3000")
    words = ["".join(rng.choice(pool) for _ in range(rng.randint(1, 6))) for _ in range(60)]
    return ["".join(rng.choice(words) if rng.random() < 0.7 else rng.choice(pool) for _ in range(rng.randint(1, 80)))
            for _ in range(n)]


@pytest.mark.parametrize("which", ["english", "unicode"])
def test_fast_tokenizer_encodes_varied_unicode_like_picochat(tok, which):
    """Two tokenizers: the English-ish one of the other tests, and one trained on random mixed-script
    text, whose merges cross scripts, emoji ZWJ sequences and whitespace runs."""
    if which == "unicode":
        tok = Tokenizer.train(random_unicode(400, seed=2), vocab_size=1200)
        assert tok.vocab_size > 1000
    fast = build_fast_tokenizer(tok)
    texts = [t for t in SAMPLE_TEXTS if "<|" not in t] + random_unicode(300, seed=1)
    texts += ["'s 've 'LL  \n\n\n  x", "12345678901", " " * 17 + "\n", "\r\n\r\n", ""]
    for text in texts:
        ids = tok.encode(text)
        assert fast.encode(text, add_special_tokens=False).ids == ids, text
        assert fast.decode(ids, skip_special_tokens=False) == tok.decode(ids)
    assert fast.encode("hi").ids == tok.encode("hi", prepend=tok.bos_token_id)  # like `picochat sample`


@pytest.mark.parametrize("tag", ["sft/mha", "sft/gqa"])
def test_transformers_loads_export_with_same_logits_and_greedy_text(exported, tok, tag):
    model, d = exported[tag]
    assert sorted(p.name for p in d.iterdir()) == [
        "README.md", "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
        "picochat_export.json", "tokenizer.json", "tokenizer_config.json"]
    hf = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(d))
    assert type(hf).__name__ == "NanoChatForCausalLM"
    assert hf.config.num_key_value_heads == model.config.n_kv_head
    assert hf.model.embed_tokens.padding_idx is None  # <|bos|> (the pad) stays trainable in HF
    assert hf.generation_config.pad_token_id == tok.bos_token_id
    ids = tok.render_conversation(CONVERSATIONS[2])[0]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))
        theirs = hf(torch.tensor([ids])).logits
    assert ours.std() > 0.1  # trained: not a degenerate, all-equal distribution
    assert (ours - theirs).abs().max() <= TOL

    for conv in CONVERSATIONS[:2]:
        prompt = tok.render_for_completion(conv)
        mine = Engine(model, tok).generate([prompt], 24, temperature=0.0)[0]
        x = torch.tensor([prompt])
        gen = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=24, do_sample=False)
        assert gen[0, len(prompt):].tolist() == mine and len(mine) > 1
        assert hf_tok.decode(gen[0, len(prompt):]) == tok.decode(mine)
    text = "the cat sat"  # base-model style: the tokenizer prepends <|bos|> as `picochat sample` does
    prompt = hf_tok(text, return_tensors="pt")
    assert prompt["input_ids"][0].tolist() == tok.encode(text, prepend=tok.bos_token_id)
    gen = hf.generate(**prompt, max_new_tokens=16, do_sample=False)
    mine = Engine(model, tok).generate([tok.encode(text, prepend=tok.bos_token_id)], 16, temperature=0.0)[0]
    assert hf_tok.decode(gen[0, prompt["input_ids"].shape[1]:]) == tok.decode(mine)


def test_chat_template_ids_equal_render_conversation(exported, tok):
    hf_tok = AutoTokenizer.from_pretrained(str(exported["sft/mha"][1]))
    for conv in CONVERSATIONS:
        ids = hf_tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
        assert ids == tok.render_conversation(conv)[0]
        if conv[-1]["role"] == "user":
            ids = hf_tok.apply_chat_template(conv, add_generation_prompt=True, return_dict=True)["input_ids"]
            assert ids == tok.render_for_completion(conv)
    with pytest.raises(Exception, match="alternate"):
        hf_tok.apply_chat_template([{"role": "assistant", "content": "x"}], tokenize=False)


def test_model_card_has_training_facts(exported):
    card = (exported["sft/gqa"][1] / "README.md").read_text()
    assert "library_name: transformers" in card and "sft/gqa" in card
    assert "| validation bits per byte | 2.5 |" in card and "| last training loss | 4.25 |" in card and "| attention heads / KV heads | 4 / 2 (GQA) |" in card
    assert "AutoModelForCausalLM" in card


def test_model_card_quotes_and_links_the_report_card(exported, tmp_path):
    report = tokenizer_dir().parent / "report"
    report.mkdir()
    (report / "report.md").write_text(
        "# picochat report card\n\n## Training\n\n| tag | stage | val bpb |\n|---|---|---|\n"
        "| `sft/mha` | sft | 2.1 |\n| `sft/gqa` | sft | 2.5 |\n\n![Training loss](loss.png)\n")
    (report / "loss.png").write_bytes(b"\x89PNG fake")
    try:
        assert main(["export", "hf", "--model", "sft/gqa", "--out", str(tmp_path / "e")]) == 0
    finally:
        for f in report.iterdir():
            f.unlink()
        report.rmdir()
    card = (tmp_path / "e" / "README.md").read_text()
    assert "[report/report.md](report/report.md)" in card
    assert "| tag | stage | val bpb |\n|---|---|---|\n| `sft/gqa` | sft | 2.5 |" in card and "`sft/mha`" not in card
    assert (tmp_path / "e" / "report" / "loss.png").read_bytes() == b"\x89PNG fake"


def test_mla_is_refused_by_name(tok, tmp_path):
    cfg = GPTConfig(n_layer=1, n_head=2, n_kv_head=2, n_embd=32, vocab_size=tok.vocab_size, sequence_len=32,
                    attention="mla", kv_lora_rank=8, qk_rope_head_dim=4)
    with pytest.raises(PicochatError, match=r"Multi-head Latent Attention \(MLA"):
        hf_mod.check_exportable(cfg)
    try:
        model = GPT(cfg)
    except ImportError:  # picochat/model/mla.py not available: the config-level check above stands
        return
    ck.save_checkpoint("sft/mla", 1, model, cfg, {"tokenizer_vocab": tok.vocab_size})
    with pytest.raises(PicochatError, match="MLA"):
        hf_mod.export_hf("sft/mla", tmp_path / "mla")
    assert not (tmp_path / "mla").exists()


def test_failed_check_writes_nothing(exported, tmp_path, monkeypatch):
    """A mapping bug (layer 0's query and key weights swapped) is caught by the logits check."""
    names = hf_mod.weight_names

    def swapped(n_layer):
        m = names(n_layer)
        q, k = "transformer.h.0.attn.c_q.weight", "transformer.h.0.attn.c_k.weight"
        m[q], m[k] = m[k], m[q]
        return m

    monkeypatch.setattr(hf_mod, "weight_names", swapped)
    with pytest.raises(PicochatError, match=r"export check failed, nothing written: logits differ by .* > "
                                            r"tolerance 0.001 on a 64-token prompt"):
        hf_mod.export_hf("sft/mha", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_cli_errors_are_one_line(exported, tmp_path, capsys):
    assert main(["export", "hf", "--model", "sft/nope", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("picochat: error: no checkpoint with tag 'sft/nope'") and err.count("\n") == 1
    assert main(["export", "hf", "--model", "sft/mha", "--out", str(exported["sft/mha"][1])]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["import", "hf", "--path", str(tmp_path)]) == 1
    assert "no config.json" in capsys.readouterr().err
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "stale.txt").write_text("x")
    assert main(["export", "hf", "--model", "sft/mha", "--out", str(tmp_path / "old"), "--force"]) == 0
    assert not (tmp_path / "old" / "stale.txt").exists() and (tmp_path / "old" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no temp or moved-aside dirs left


def test_missing_transformers_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(PicochatError, match=r"needs transformers >= 5: pip install 'picochat\[hf-export\]'"):
        hf_mod.require_transformers()


def _same_dir(a, b):
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].dtype == wb[k].dtype and torch.equal(wa[k], wb[k]), k
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert json.loads((a / name).read_text()) == json.loads((b / name).read_text()), name
    assert (a / "chat_template.jinja").read_text() == (b / "chat_template.jinja").read_text()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_import_then_export_is_identical(exported, tok, tmp_path, dtype):
    first = tmp_path / "first"
    assert main(["export", "hf", "--model", "sft/gqa", "--out", str(first), "--dtype", dtype]) == 0
    assert main(["import", "hf", "--path", str(first), "--tag", f"hf/rt-{dtype}"]) == 0
    model, c = ck.load_model(f"hf/rt-{dtype}")
    assert c.config == ck.read_checkpoint("sft/gqa").config and c.step == 30
    assert c.meta["source_meta"]["val_bpb"] == 2.5
    second = tmp_path / "second"
    assert main(["export", "hf", "--model", f"hf/rt-{dtype}", "--out", str(second)]) == 0
    _same_dir(first, second)


def test_import_public_style_nanochat_dir(exported, tok, tmp_path, capsys):
    """A directory as transformers' own nanochat converter writes it: save_pretrained in bf16 with
    rms_norm_eps=1e-6 and a tokenizer.json from TikTokenConverter (what convert_tiktoken_to_fast runs)."""
    from transformers import NanoChatConfig, NanoChatForCausalLM
    from transformers.convert_slow_tokenizer import TikTokenConverter
    src = exported["sft/mha"][1]
    cfg = NanoChatConfig.from_pretrained(str(src))
    cfg.rms_norm_eps = 1e-6
    hf = NanoChatForCausalLM.from_pretrained(str(src), config=cfg, dtype=torch.bfloat16)
    d = tmp_path / "nanochat-tiny"
    hf.save_pretrained(str(d), max_shard_size="100KB")  # sharded, with model.safetensors.index.json
    assert (d / "model.safetensors.index.json").is_file()
    ranks_file = str(tokenizer_dir() / "tokenizer.tiktoken")  # tiktoken's own format
    TikTokenConverter(ranks_file, pattern=tok._pattern, extra_special_tokens=SPECIAL_TOKENS).converted().save(
        str(d / "tokenizer.json"))
    assert main(["import", "hf", "--path", str(d)]) == 0
    out = capsys.readouterr().out
    assert "rms_norm_eps=1e-06" in out
    model, c = ck.load_model("hf/nanochat-tiny")
    assert c.config.n_kv_head == cfg.num_key_value_heads and c.config.softcap == 15.0
    ref = load_file(str(src / "model.safetensors"))
    assert torch.equal(model.lm_head.weight, ref["lm_head.weight"].to(torch.bfloat16).float())
    assert load_file(str(c.path / "model.safetensors"))["lm_head.weight"].dtype == torch.bfloat16


def test_import_refusals(exported, tok, tmp_path):
    src = exported["sft/mha"][1]
    d = tmp_path / "bad"
    d.mkdir()
    for f in src.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, model_type="llama")))
    with pytest.raises(PicochatError, match="model_type is 'llama'"):
        hf_mod.import_hf(d)
    (d / "config.json").write_text(json.dumps(dict(cfg, hidden_act="silu")))
    with pytest.raises(PicochatError, match="hidden_act 'silu'"):
        hf_mod.import_hf(d)
    (d / "config.json").write_text(json.dumps(cfg))
    spec = json.loads((src / "tokenizer.json").read_text())
    spec["added_tokens"] = spec["added_tokens"][:-1]
    (d / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(PicochatError, match=r"added tokens differ .*<\|output_end\|>"):
        hf_mod.import_hf(d)
    (d / "tokenizer.json").unlink()
    (d / "tokenizer.pkl").write_bytes(b"not loaded")
    with pytest.raises(PicochatError, match="no tokenizer.json.*tokenizer.pkl is not loaded"):
        hf_mod.import_hf(d)
    other = Tokenizer.train([corpus()[:5000]], vocab_size=300)
    other.save(tmp_path / "other")
    assert main(["export", "hf", "--model", "sft/mha", "--out", str(tmp_path / "plain")]) == 0
    tok_dir = tokenizer_dir()
    saved = {p.name: p.read_bytes() for p in tok_dir.iterdir()}
    try:
        # a home whose tokenizer differs: the import carries its own tokenizer and leaves the home's alone
        # (it used to be refused, when one home could hold only one tokenizer)
        exported = Tokenizer.load(tok_dir)  # what sft/mha was trained with
        other.save(tok_dir)
        r = hf_mod.import_hf(tmp_path / "plain", tag="hf/x")
        assert not r["replaced_tokenizer"] and Tokenizer.load(tok_dir).same_encoding(other)
        assert ck.load_tokenizer("hf/x").same_encoding(exported) and not exported.same_encoding(other)
        r = hf_mod.import_hf(tmp_path / "plain", tag="hf/y", replace_tokenizer=True)
        assert r["replaced_tokenizer"] and Tokenizer.load(tok_dir).same_encoding(exported)
    finally:
        for name, data in saved.items():
            (tok_dir / name).write_bytes(data)
