"""`picochat import nanochat`: real nanochat checkpoints (tests/fixtures/nanochat, written by nanochat's
own code at c6abcdf and 92d63d4: scripts/make_nanochat_fixtures.py) give nanochat's logits, greedy continuations, token ids and chat
rendering; hub layout and hub ids; bad input is one error line with nothing written."""
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from picochat import checkpoint as ck
from picochat.cli import main
from picochat.export import nanochat as nc
from picochat.inference.engine import Engine

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "nanochat"
DESIGNS = {"v2025_d2": "2025", "v2026_d2": "2026"}


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    # committed with the repo: a missing fixture is a failure, never a skip
    assert all((FIXTURES / d / "reference.pt").is_file() for d in DESIGNS), \
        f"nanochat fixtures missing under {FIXTURES}: python scripts/make_nanochat_fixtures.py --nanochat PATH"
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def ckpt_dir(name: str) -> Path:
    return FIXTURES / name / "base_checkpoints" / "d2"


def reference(name: str) -> dict:
    return torch.load(FIXTURES / name / "reference.pt", weights_only=False)  # our own fixture: trusted


def imported(name: str, tag: str = "nc/x"):
    assert main(["import", "nanochat", "--path", str(ckpt_dir(name)), "--tag", tag]) == 0
    model, _ = ck.load_model(tag)
    return model, ck.load_tokenizer(tag)


@pytest.mark.parametrize("name", DESIGNS)
def test_logits_equal_nanochat_forward(name):
    model, _ = imported(name)
    ref = reference(name)
    with torch.no_grad():
        for seq, logits in zip(ref["seqs"], ref["logits"]):
            out = model(seq[None])
            assert out.shape == (1, *logits.shape)
            # measured 0 (2025) and 1.4e-6 (2026) on these fixtures, logits up to |7.8|; the earlier 4096-token
            # fixtures gave 1.9e-6-3.3e-6: 1e-5 leaves room for another CPU's summation order, not for a wrong op
            assert (out[0] - logits).abs().max().item() < 1e-5, f"{name}, {len(seq)} tokens"


@pytest.mark.parametrize("name", DESIGNS)
def test_greedy_kv_cache_continuations_equal_nanochat_engine(name):
    model, tok = imported(name)
    ref = reference(name)
    engine = Engine(model, tok)
    for prompt, greedy in zip(ref["prompts"], ref["greedy"]):
        n = len(greedy) - len(prompt)
        out = engine.generate([prompt], n, temperature=0.0, stop_tokens=set())[0]
        assert prompt + out == greedy
    # batched, left-padded: each row still nanochat's continuation
    n = min(len(g) - len(p) for p, g in zip(ref["prompts"], ref["greedy"]))
    batched = engine.generate(ref["prompts"], n, temperature=0.0, stop_tokens=set())
    assert [p + b for p, b in zip(ref["prompts"], batched)] == [g[:len(p) + n] for p, g in zip(ref["prompts"], ref["greedy"])]


@pytest.mark.parametrize("name", DESIGNS)
def test_tokenizer_and_chat_rendering_equal_nanochat(name):
    _, tok = imported(name)
    ref = reference(name)
    assert [tok.encode(t) for t in ref["texts"]] == ref["text_ids"]
    ids, mask = tok.render_conversation(ref["conversation"])
    assert ids == ref["conversation_ids"] and mask == ref["conversation_mask"]


def test_design_recorded_and_2026_config(home):
    imported("v2026_d2", "nc/new")
    imported("v2025_d2", "nc/old")
    new, old = ck.read_checkpoint("nc/new"), ck.read_checkpoint("nc/old")
    assert new.meta["nanochat_design"] == "2026" and old.meta["nanochat_design"] == "2025"
    c = new.config
    assert (c.value_embeds, c.layer_scalars, c.smear, c.backout, c.window_pattern, c.qk_scale, c.rope_base,
            c.pad_vocab_to) == (True, True, True, True, "SSSL", 1.2, 100000.0, 64)
    assert old.config.rope_table_dtype == "bfloat16" and not old.config.smear
    # the tokenizer travels with the checkpoint: the home has none, every command still finds it
    assert not (home / "tokenizer").exists()
    assert (new.path / "tokenizer.tiktoken").is_file()


def test_hub_layout_and_base_dir_layout(tmp_path):
    hub = tmp_path / "hub" / "nanochat-d2"
    hub.mkdir(parents=True)
    for f in ckpt_dir("v2026_d2").iterdir():
        shutil.copy(f, hub / f.name)
    shutil.copy(FIXTURES / "v2026_d2" / "tokenizer" / "tokenizer.pkl", hub / "tokenizer.pkl")
    r = nc.import_nanochat(str(hub))
    assert r["tag"] == "nanochat/nanochat-d2" and r["design"] == "2026"
    base = nc.import_nanochat(str(ckpt_dir("v2026_d2")), tag="nc/base-dir")
    a, _ = ck.load_model(r["tag"])
    b, _ = ck.load_model(base["tag"])
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_hub_repo_id_downloads_through_huggingface_hub(tmp_path, monkeypatch):
    """The hub path with no network: snapshot_download is pointed at a folder laid out like the hub."""
    import huggingface_hub
    hub = tmp_path / "snapshot"
    hub.mkdir()
    for f in ckpt_dir("v2025_d2").iterdir():
        shutil.copy(f, hub / f.name)
    shutil.copy(FIXTURES / "v2025_d2" / "tokenizer" / "tokenizer.pkl", hub / "tokenizer.pkl")
    calls = []

    def fake_download(repo_id, allow_patterns=None, **kw):
        calls.append((repo_id, allow_patterns))
        return str(hub)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert main(["import", "nanochat", "--path", "someone/nanochat-d2", "--tag", "hub/d2"]) == 0
    assert calls[0][0] == "someone/nanochat-d2" and "tokenizer.pkl" in calls[0][1]
    assert ck.read_checkpoint("hub/d2").meta["nanochat_design"] == "2025"


def test_hub_repo_id_offline_is_one_clear_error(monkeypatch, capsys, home):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home.parent / "hf-empty"))
    assert main(["import", "nanochat", "--path", "nobody/not-downloaded"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("picochat: error: cannot download nobody/not-downloaded")
    assert not (home / "checkpoints").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/picochat-pwned",))


def _copy_fixture(tmp_path: Path, name: str) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(FIXTURES / name, dst)
    for p in dst.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dst / "base_checkpoints" / "d2"


@pytest.mark.parametrize("case,expected", [
    ("missing-model", "has no model_<step>.pt"),
    ("missing-meta", "has model_000030.pt but no meta_000030.json"),
    ("missing-tokenizer", "no tokenizer.pkl next to"),
    ("unknown-step", "has no step 7; it has steps 30"),
    ("corrupt-model", "cannot read .*model_000030.pt as plain weights"),
    ("corrupt-meta", "meta_000030.json is not valid JSON"),
    ("bad-config", "has no model_config with integer"),
    ("malicious-tokenizer", "refusing .*tokenizer.pkl: not a plain nanochat tokenizer pickle .*posix.system"),
    ("malicious-model", "cannot read .*model_000030.pt as plain weights"),
    ("wrong-tokenizer", "refusing .*tokenizer.pkl: not a tiktoken Encoding"),
    ("missing-weight", "do not fit a nanochat model of their model_config .*missing \\['lm_head.weight'\\]"),
    ("between-designs", "between the 2025 .* and 2026"),
    ("hf-folder", "looks like a Hugging Face transformers folder: use `picochat import hf`"),
    ("not-a-dir", "is not a directory"),
])
def test_bad_input_is_one_error_line_and_nothing_written(tmp_path, home, capsys, case, expected):
    d = _copy_fixture(tmp_path, "v2026_d2")
    tok_pkl = d.parent.parent / "tokenizer" / "tokenizer.pkl"
    model_pt, meta = d / "model_000030.pt", d / "meta_000030.json"
    args = ["import", "nanochat", "--path", str(d)]
    if case == "missing-model":
        model_pt.unlink()
    elif case == "missing-meta":
        meta.unlink()
    elif case == "missing-tokenizer":
        tok_pkl.unlink()
    elif case == "unknown-step":
        args += ["--step", "7"]
    elif case == "corrupt-model":
        model_pt.write_bytes(model_pt.read_bytes()[:5000])
    elif case == "corrupt-meta":
        meta.write_text("{not json")
    elif case == "bad-config":
        meta.write_text(json.dumps({"model_config": {"n_layer": "two"}}))
    elif case == "malicious-tokenizer":
        tok_pkl.write_bytes(pickle.dumps(_Evil()))
    elif case == "malicious-model":
        torch.save({"x": _Evil()}, model_pt)
    elif case == "wrong-tokenizer":
        tok_pkl.write_bytes(pickle.dumps({"just": "a dict"}))
    elif case == "missing-weight":
        state = torch.load(model_pt, weights_only=True)
        del state["lm_head.weight"]
        torch.save(state, model_pt)
    elif case == "between-designs":
        state = torch.load(model_pt, weights_only=True)
        del state["smear_gate.weight"], state["smear_lambda"], state["backout_lambda"]
        torch.save(state, model_pt)
    elif case == "hf-folder":
        model_pt.unlink()
        (d / "config.json").write_text("{}")
    elif case == "not-a-dir":
        args[3] = str(d / "nothing-here")
    if os.path.exists("/tmp/picochat-pwned"):
        os.unlink("/tmp/picochat-pwned")
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("picochat: error: ")
    assert re.search(expected, err), err
    assert not os.path.exists("/tmp/picochat-pwned")  # nothing from the files ran
    assert not (home / "checkpoints").exists() or not any((home / "checkpoints").rglob("*.safetensors"))


def test_restricted_unpickler_reads_the_real_tokenizer_without_tiktoken_import_side_effects():
    tok = nc.read_tokenizer_pickle(FIXTURES / "v2025_d2" / "tokenizer" / "tokenizer.pkl")
    # nanochat's tok_train at 300 tokens: 256 bytes + 35 merges, then its 9 special tokens, <|bos|> first
    assert tok.vocab_size == 300 and tok.encode_special("<|bos|>") == 291
    with pytest.raises(pickle.UnpicklingError, match="may only hold a tiktoken.core.Encoding"):
        nc._TokenizerUnpickler.find_class(nc._TokenizerUnpickler(__import__("io").BytesIO(b"")), "builtins", "eval")
