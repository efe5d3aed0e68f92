"""`picochat export hf` / `import hf`: picochat checkpoint <-> Hugging Face transformers `nanochat`
model directory.

The architectures match one to one (checked against transformers 5's modeling_nanochat.py; the
table is in docs/export.md): weights are renamed, never transformed. What HF cannot express is
refused with a message naming it: Multi-head Latent Attention, any config field the mapping does
not know at a non-default value, and any weight the mapping does not place.

Both directions run a logits check before anything is published: export writes into a temporary
directory next to --out and renames it into place only if transformers, loading that directory,
gives picochat's logits on a fixed prompt (and its tokenizer gives picochat's ids); import saves
the checkpoint only after the same comparison.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from picochat import checkpoint as ck
from picochat.common import PicochatError, atomic_dir, home, tokenizer_dir, write_json_atomic
from picochat.export import DEFAULT_ATOL, DTYPE_NAMES
from picochat.export import hf_tokenizer as hft
from picochat.model.config import GPTConfig
from picochat.model.gpt import GPT
from picochat.tokenizer import Tokenizer

# Picochat's parameter-free norms use the input dtype's epsilon: in fp32 (how exported models are
# checked, and how picochat runs on CPU) that is the rms_norm_eps written here.
RMS_EPS = float(torch.finfo(torch.float32).eps)  # what F.rms_norm(x) uses for fp32 x
MAPPED_FIELDS = {"sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "attention",
                 "softcap", "rope_base",
                 # nanochat 2025 checkpoints (picochat import nanochat): HF computes rotary tables in fp32,
                 # which moves logits by ~1e-3 (reported by the export), and HF's vocab is the real one
                 # (padding rows are never looked up, so they are cropped)
                 "rope_table_dtype", "pad_vocab_to"}
MLA_FIELDS = {"kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "mla_absorb"}  # unused unless attention == mla
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
PADDED_ROWS = ("transformer.wte.weight", "lm_head.weight")
LAYER_WEIGHTS = {"attn.c_q": "self_attn.q_proj", "attn.c_k": "self_attn.k_proj", "attn.c_v": "self_attn.v_proj",
                 "attn.c_proj": "self_attn.o_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
CHECK_CONVERSATIONS = [
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "What is 12 * 7? Answer briefly."},
     {"role": "assistant", "content": [{"type": "text", "text": "Let me compute: "},
                                       {"type": "python", "text": "12*7"},
                                       {"type": "python_output", "text": "84"},
                                       {"type": "text", "text": " It is 84."}]},
     {"role": "user", "content": "Thanks! Now say hi in Japanese: こんにちは?"},
     {"role": "assistant", "content": "こんにちは 👋"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!\n\n  How can I help?"}],
]


def require_transformers():
    """Import transformers >= 5 (the first release with the `nanochat` model type) or explain."""
    try:
        import transformers
    except ImportError:
        raise PicochatError("Hugging Face export/import needs transformers >= 5: "
                            "pip install 'picochat[hf-export]'") from None
    if int(transformers.__version__.split(".")[0]) < 5:
        raise PicochatError(f"transformers {transformers.__version__} has no 'nanochat' model type; "
                            "pip install 'transformers>=5'")
    return transformers


# --------------------------------------------------------------------------- mapping


def weight_names(n_layer: int) -> dict[str, str]:
    """picochat state-dict name -> HF NanoChatForCausalLM name."""
    names = {"transformer.wte.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"}
    for i in range(n_layer):
        names.update({f"transformer.h.{i}.{ours}.weight": f"model.layers.{i}.{theirs}.weight"
                      for ours, theirs in LAYER_WEIGHTS.items()})
    return names


def check_exportable(config: GPTConfig) -> None:
    """Refuse, naming the feature, any model the HF nanochat architecture cannot express."""
    if config.attention == "mla":
        raise PicochatError("cannot export a Multi-head Latent Attention (MLA, attention='mla') model: the "
                            "Hugging Face 'nanochat' architecture only has standard multi-head/grouped-query "
                            "attention, and dropping or folding MLA's latent projections would change the model")
    default = GPTConfig()
    odd = [f.name for f in dataclasses.fields(GPTConfig)
           if f.name not in MAPPED_FIELDS | MLA_FIELDS and getattr(config, f.name) != getattr(default, f.name)]
    if odd:
        raise PicochatError(f"cannot export: config field(s) {', '.join(odd)} have no equivalent in the "
                            "Hugging Face 'nanochat' architecture")


def hf_config(config: GPTConfig, tok: Tokenizer, dtype: torch.dtype):
    from transformers import NanoChatConfig
    cfg = NanoChatConfig(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=4 * config.n_embd,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head, max_position_embeddings=config.sequence_len,
        hidden_act="relu2", rms_norm_eps=RMS_EPS, attention_bias=False, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rope_base)},
        final_logit_softcapping=float(config.softcap) if config.softcap else None,
        # pad_token_id stays None here: HF makes it the embedding's padding_idx, which would freeze
        # the <|bos|> row (picochat's pad) in any HF fine-tuning; generation_config and the
        # tokenizer still name <|bos|> as pad
        bos_token_id=tok.bos_token_id, eos_token_id=tok.encode_special(hft.EOS), pad_token_id=None)
    cfg.architectures = ["NanoChatForCausalLM"]
    cfg.dtype = str(dtype).removeprefix("torch.")
    return cfg


def picochat_config(hf: dict) -> GPTConfig:
    """HF nanochat config.json dict -> GPTConfig, refusing what picochat cannot run."""
    def refuse(why: str) -> PicochatError:
        return PicochatError(f"cannot import this nanochat checkpoint: {why}")

    if hf.get("model_type") != "nanochat":
        raise refuse(f"model_type is {hf.get('model_type')!r}; picochat imports only 'nanochat' models")
    absent = [k for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size") if k not in hf]
    if absent:
        raise refuse(f"config.json lacks {', '.join(absent)}")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    for bad, why in (
            (hf.get("hidden_act", "relu2") != "relu2",
             f"hidden_act {hf.get('hidden_act')!r} (picochat's MLP is relu²)"),
            (hf.get("attention_bias") or hf.get("qkv_bias"), "attention biases (picochat has no biases)"),
            (hf.get("tie_word_embeddings"), "tied embeddings (picochat's lm_head is untied)"),
            (hf.get("intermediate_size", 4 * hidden) != 4 * hidden,
             f"intermediate_size {hf.get('intermediate_size')} != 4 x hidden_size (picochat's MLP width)"),
            (hf.get("head_dim") not in (None, hidden // heads),
             f"head_dim {hf.get('head_dim')} != hidden_size / num_attention_heads"),
            (rope.get("rope_type", "default") != "default",
             f"rope_type {rope.get('rope_type')!r} (picochat has plain rotary only)")):
        if bad:
            raise refuse(why)
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    n_kv = hf.get("num_key_value_heads") or heads
    try:
        return GPTConfig(sequence_len=hf.get("max_position_embeddings", 2048), vocab_size=hf["vocab_size"],
                         n_layer=hf["num_hidden_layers"], n_head=heads, n_kv_head=n_kv, n_embd=hidden,
                         attention="gqa" if n_kv < heads else "mha",
                         softcap=float(hf.get("final_logit_softcapping") or 0.0), rope_base=float(theta))
    except ValueError as e:
        raise refuse(str(e)) from None


# --------------------------------------------------------------------------- the logits check


def check_prompt(tok: Tokenizer, config: GPTConfig) -> list[int]:
    """A fixed prompt with chat specials, tool tokens, Unicode and plain text, within the context."""
    ids, _ = tok.render_conversation(CHECK_CONVERSATIONS[0])
    ids += tok.encode(" ".join(hft.SAMPLE_TEXTS[:5]))
    return [i for i in ids if i < config.vocab_size][: min(config.sequence_len, 96)]


@torch.no_grad()
def compare_logits(model: GPT, hf_model, ids: list[int]) -> float:
    """Max |logit difference| between picochat and transformers on `ids` (both fp32, CPU)."""
    x = torch.tensor([ids])
    return float((model(x).float() - hf_model(input_ids=x).logits.float()).abs().max())


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' progress bars and warnings (e.g. "sequence longer than
    model_max_length", which the check prompts trip on purpose) for the duration of a check."""
    from transformers.utils import logging as hf_logging
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _load_hf_model(path: Path, **config_overrides):
    transformers = require_transformers()
    try:  # keyword arguments that name config fields override the saved config
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **config_overrides)
    except Exception as e:  # noqa: BLE001 - any load failure means the directory is not usable
        raise PicochatError(f"transformers cannot load {path}: {type(e).__name__}: {e}") from None
    return model.eval()


# --------------------------------------------------------------------------- export


def export_hf(tag: str, out, step: int | None = None, dtype: str = "checkpoint", atol: float = DEFAULT_ATOL,
              force: bool = False) -> dict:
    """Write the HF directory for checkpoint `tag` at `out` (atomically). Returns a summary."""
    require_transformers()
    from transformers import AutoTokenizer, GenerationConfig
    from picochat.export.card import model_card

    out = Path(out).expanduser().resolve()
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise PicochatError(f"{out} already exists and is not empty; pass --force to replace it")
    ckpt = ck.read_checkpoint(tag, step)
    config = ckpt.config
    check_exportable(config)
    tok = ck.load_tokenizer(tag, step)
    raw = ckpt.weights()
    names = weight_names(config.n_layer)
    extra = sorted(set(raw) - set(names))
    if extra:
        raise PicochatError(f"cannot export: weights {', '.join(extra[:5])} have no place in the Hugging Face "
                            "'nanochat' architecture (refusing to drop them)")
    stored = {t.dtype for t in raw.values()}
    if dtype == "checkpoint":
        target = stored.pop() if len(stored) == 1 else torch.float32
    elif dtype in DTYPES:
        target = DTYPES[dtype]
    else:
        raise PicochatError(f"unknown dtype {dtype!r}; use checkpoint, {', '.join(DTYPES)}")
    V = config.vocab_size  # a padded vocab (nanochat 2026 and late-2025 imports) keeps only the real rows
    weights = {names[k]: (v[:V] if k in PADDED_ROWS else v).to(target).contiguous() for k, v in raw.items()}
    n_params = sum(t.numel() for t in weights.values())
    del raw  # with --dtype checkpoint `weights` shares its tensors; otherwise one less copy in memory

    with atomic_dir(out) as tmp:
        hf_cfg = hf_config(config, tok, target)
        hf_cfg.save_pretrained(str(tmp))
        GenerationConfig(bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
                         eos_token_id=[tok.encode_special(hft.EOS), tok.bos_token_id]).save_pretrained(str(tmp))
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        hft.save_hf_tokenizer(tok, tmp, config.sequence_len)

        # the check: the reference is picochat's own model on the exported (possibly rounded) weights
        model, _ = ck.load_model(tag, step=ckpt.step)
        if target != torch.float32:  # round the parameters only: rotary tables stay fp32, as in HF
            for p in model.parameters():
                p.data = p.data.to(target).float()
        ids = check_prompt(tok, config)
        drift = {}
        with quiet_transformers():
            hf_model = _load_hf_model(tmp)
            if config.rope_table_dtype != "float32":  # HF computes its tables in fp32: report the drift, compare
                drift["rope_table_drift_max_abs_logit_diff"] = compare_logits(model, hf_model, ids)  # with fp32 ones
                model.config = dataclasses.replace(config, rope_table_dtype="float32")
                model.reset_rotary()
            diff = compare_logits(model, hf_model, ids)
            problems = hft.check_hf_tokenizer(tok, AutoTokenizer.from_pretrained(str(tmp)), CHECK_CONVERSATIONS)
        if not diff <= atol:  # also catches NaN
            problems.insert(0, f"logits differ by {diff:.3g} > tolerance {atol:g} on a {len(ids)}-token prompt")
        if problems:
            raise PicochatError("export check failed, nothing written: " + "; ".join(problems))
        check = {"prompt_tokens": len(ids), "max_abs_logit_diff": diff, "atol": atol, "tokenizer": "identical ids",
                 **drift}
        report = home() / "report" / "report.md"
        (tmp / "README.md").write_text(model_card(tag, ckpt, tok, hf_cfg, n_params, check,
                                                  report if report.is_file() else None, tmp), encoding="utf-8")
        write_json_atomic(tmp / "picochat_export.json", {"tag": tag, "step": ckpt.step, "meta": ckpt.meta,
                                                         "picochat_config": config.to_dict(), "check": check})
    return {"out": str(out), "tag": tag, "step": ckpt.step, "dtype": str(target), **check}


# --------------------------------------------------------------------------- import


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    try:
        if (path / "model.safetensors").is_file():
            return load_file(str(path / "model.safetensors"))
        if index.is_file():
            weights = {}
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                weights.update(load_file(str(path / shard)))
            return weights
        if (path / "pytorch_model.bin").is_file():
            return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated files, bad headers, bad index
        raise PicochatError(f"cannot read the weights in {path} ({type(e).__name__}: {e})") from None
    raise PicochatError(f"{path} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def import_hf(path, tag: str | None = None, replace_tokenizer: bool = False, atol: float = DEFAULT_ATOL) -> dict:
    """Save the HF nanochat directory `path` as picochat checkpoint `tag` (default hf/<dir name>)."""
    require_transformers()
    path = Path(path).expanduser().resolve()
    if not (path / "config.json").is_file():
        native = any(path.glob("model_*.pt")) and any(path.glob("meta_*.json"))
        raise PicochatError(f"{path} is not a Hugging Face model directory (no config.json)" + (
            "; it looks like a native nanochat checkpoint: convert it with transformers' "
            "convert_nanochat_checkpoints.py first" if native else ""))
    try:
        hf = json.loads((path / "config.json").read_text())
    except ValueError as e:
        raise PicochatError(f"{path / 'config.json'} is not valid JSON ({e})") from None
    config = picochat_config(hf)
    tag = tag or f"hf/{path.name}"
    ck.tag_dir(tag)  # validate the tag before the slow part
    tok = hft.tokenizer_from_hf(path)
    if tok.vocab_size > config.vocab_size:
        raise PicochatError(f"the tokenizer has {tok.vocab_size} tokens but the model only {config.vocab_size}")
    current = Tokenizer.load(tokenizer_dir()) if (tokenizer_dir() / "tokenizer.json").exists() else None

    raw = _read_hf_weights(path)
    raw = {k: v for k, v in raw.items() if not k.endswith("rotary_emb.inv_freq")}  # derived, old exports
    names = {v: k for k, v in weight_names(config.n_layer).items()}
    dtypes = {t.dtype for t in raw.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    model = ck.build_model(config, {names.get(k, k): v for k, v in raw.items()},
                           f"the weights in {path} do not fit a nanochat model of their config.json")

    # the check: same logits as transformers with picochat's norm epsilon; a checkpoint written
    # with another rms_norm_eps (1e-6 is HF's default) is reported with the drift it causes
    ids = check_prompt(tok, config)
    with quiet_transformers():
        diff = compare_logits(model, _load_hf_model(path, rms_norm_eps=RMS_EPS), ids)
        if not diff <= atol:
            raise PicochatError(f"import check failed, nothing written: logits differ from transformers by "
                                f"{diff:.3g} > {atol:g} on a {len(ids)}-token prompt")
        check = {"prompt_tokens": len(ids), "max_abs_logit_diff": diff, "atol": atol}
        eps = hf.get("rms_norm_eps", RMS_EPS)
        if eps != RMS_EPS:
            check["source_rms_norm_eps"] = eps
            check["eps_drift_max_abs_logit_diff"] = compare_logits(model, _load_hf_model(path), ids)

    export_json = path / "picochat_export.json"  # a picochat export: keep its training facts
    source = json.loads(export_json.read_text()) if export_json.is_file() else {}
    meta = {"stage": "import", "source": str(path), "tokenizer_vocab": tok.vocab_size, "hf_config": hf,
            "import_check": check, "source_meta": source.get("meta", {})}
    model.to(dtype)
    saved = ck.save_checkpoint(tag, int(source.get("step", 0)), model, config, meta, tokenizer=tok)
    # the checkpoint carries its tokenizer; the home's default (what `tokenizer eval` and new base runs
    # use) is set only when there is none yet, or on request
    replaced = current is not None and not current.same_encoding(tok) and replace_tokenizer
    if current is None or replaced:
        tok.save(tokenizer_dir())
    return {"tag": tag, "path": str(saved), "dtype": str(dtype), "tokenizer": str(saved),
            "replaced_tokenizer": replaced, **check}
