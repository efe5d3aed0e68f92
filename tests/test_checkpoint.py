"""Checkpoints: bit-exact round trip, atomic saves, clear errors on corrupt/missing/unknown."""
import pytest
import torch

from picochat import checkpoint as ck
from picochat.common import PicochatError
from picochat.model.config import config_from_depth
from picochat.model.gpt import GPT
from picochat.train.optim import build_optimizers


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    return tmp_path


def make_model(seed=0):
    torch.manual_seed(seed)
    cfg = config_from_depth(2, vocab_size=200, sequence_len=32, aspect_ratio=32, head_dim=16, attention="gqa", n_kv_head=1)
    m = GPT(cfg)
    m.init_weights()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return m


def test_round_trip_is_bit_exact():
    m = make_model()
    opts = build_optimizers(m)
    m(torch.randint(0, 200, (2, 8)), torch.randint(0, 200, (2, 8))).backward()
    for o in opts:
        o.step()
    ck.save_checkpoint("base/t", 7, m, m.config, {"stage": "base"}, opts, {"loader": {"x": 1}})
    m2, ckpt = ck.load_model("base/t")
    assert ckpt.step == 7 and ckpt.meta["stage"] == "base" and ckpt.state == {"loader": {"x": 1}}
    assert ckpt.config == m.config
    for (k, a), (k2, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    opts2 = build_optimizers(m2)
    ck.load_optimizer_state(ckpt, opts2)
    for o, o2 in zip(opts, opts2):
        for s, s2 in zip(o.state.values(), o2.state.values()):
            for key in s:
                assert torch.equal(torch.as_tensor(s[key]), torch.as_tensor(s2[key]))


def test_latest_and_pruning(home):
    m = make_model()
    for step in (1, 2, 3):
        ck.save_checkpoint("base/t", step, m, m.config, {}, keep=2)
    steps = sorted(p.name for p in (home / "checkpoints/base/t").glob("step_*"))
    assert steps == ["step_000002", "step_000003"]
    assert ck.read_checkpoint("base/t").step == 3
    assert ck.read_checkpoint("base/t", step=2).step == 2
    assert ck.list_tags() == ["base/t"]


def test_failed_save_leaves_previous_checkpoint(home, monkeypatch):
    m = make_model()
    ck.save_checkpoint("base/t", 1, m, m.config, {})

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError):
        ck.save_checkpoint("base/t", 2, m, m.config, {})
    assert ck.read_checkpoint("base/t").step == 1
    assert [p.name for p in (home / "checkpoints/base/t").iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "bad_json"])
def test_corrupt_checkpoint_is_a_clear_error(home, damage):
    m = make_model()
    path = ck.save_checkpoint("base/t", 1, m, m.config, {})
    w = path / "model.safetensors"
    if damage == "truncate":
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif damage == "flip":
        data = bytearray(w.read_bytes())
        data[-10] ^= 0xFF
        w.write_bytes(bytes(data))
    elif damage == "delete":
        w.unlink()
    else:
        (path / "config.json").write_text("{not json")
    with pytest.raises(PicochatError, match="corrupt|missing|incomplete"):
        ck.load_model("base/t")


def test_unknown_and_invalid_tags():
    with pytest.raises(PicochatError, match="no checkpoint with tag 'sft/none'"):
        ck.load_model("sft/none")
    for bad in ("../etc", "a//b", "", "a/../b", "with space"):
        with pytest.raises(PicochatError, match="invalid checkpoint tag"):
            ck.tag_dir(bad)
