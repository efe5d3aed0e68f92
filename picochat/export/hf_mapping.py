"""picochat <-> Hugging Face transformers `nanochat`: the config and weight mapping, and the logits check.

The architectures match one to one (checked against transformers 5's modeling_nanochat.py):

| picochat (gpt.py, attention.py, layers.py)        | HF NanoChatForCausalLM                       |
|---------------------------------------------------|----------------------------------------------|
| norm(wte(idx)) before the first block             | model.norm after embed_tokens                |
| pre-norm blocks, x + attn(norm x), x + mlp(norm x)| input_layernorm / post_attention_layernorm   |
| rotary, split halves, y1 = x1 cos + x2 sin,       | rotate_half = cat(x2, -x1), cos = cat(f, f): |
|   y2 = -x1 sin + x2 cos, inv_freq base^(-2i/d)    |   the same, rope_theta = rope_base           |
| rotary THEN QK-norm                               | "RoPE -> Norm" (q_norm / k_norm)             |
| F.rms_norm(x) without eps: eps = fp32 machine eps | NanoChatRMSNorm, rms_norm_eps = 2**-23       |
| SDPA, scale head_dim**-0.5; GQA groups heads      | scaling head_dim**-0.5; repeat_kv: same      |
|   consecutively (enable_gqa)                      |   grouping                                   |
| relu(x)**2 MLP, width 4 n_embd, no biases         | hidden_act "relu2", intermediate 4 n_embd    |
| final norm, untied lm_head, 15 tanh(x / 15)       | final_logit_softcapping = softcap            |

Weights are renamed, never transformed. What HF cannot express is refused with a message naming
it: Multi-head Latent Attention (attention == "mla"), any config field the mapping does not know
at a non-default value, and any weight the mapping does not place. Picochat's parameter-free
norms use the input dtype's epsilon: in fp32 (how exported models are checked, and how picochat
runs on CPU) that is the rms_norm_eps written here; under bf16 autocast q/k norms use bf16's.

This module holds the mapping (config fields, weight names, what is refused) and the logits
check both directions run (export/hf.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch

from picochat.common import PicochatError
from picochat.export import DTYPE_NAMES
from picochat.export import hf_tokenizer as hft
from picochat.model.config import GPTConfig
from picochat.model.gpt import GPT
from picochat.tokenizer import Tokenizer

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
        ours, theirs = f"transformer.h.{i}", f"model.layers.{i}"
        names.update({
            f"{ours}.attn.c_q.weight": f"{theirs}.self_attn.q_proj.weight",
            f"{ours}.attn.c_k.weight": f"{theirs}.self_attn.k_proj.weight",
            f"{ours}.attn.c_v.weight": f"{theirs}.self_attn.v_proj.weight",
            f"{ours}.attn.c_proj.weight": f"{theirs}.self_attn.o_proj.weight",
            f"{ours}.mlp.c_fc.weight": f"{theirs}.mlp.fc1.weight",
            f"{ours}.mlp.c_proj.weight": f"{theirs}.mlp.fc2.weight",
        })
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
    if hf.get("hidden_act", "relu2") != "relu2":
        raise refuse(f"hidden_act {hf['hidden_act']!r} (picochat's MLP is relu²)")
    if hf.get("attention_bias") or hf.get("qkv_bias"):
        raise refuse("attention biases (picochat has no biases)")
    if hf.get("tie_word_embeddings"):
        raise refuse("tied embeddings (picochat's lm_head is untied)")
    if hf.get("intermediate_size", 4 * hidden) != 4 * hidden:
        raise refuse(f"intermediate_size {hf['intermediate_size']} != 4 x hidden_size (picochat's MLP width)")
    if hf.get("head_dim") not in (None, hidden // heads):
        raise refuse(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise refuse(f"rope_type {rope['rope_type']!r} (picochat has plain rotary only)")
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
    ours = model(x).float()
    theirs = hf_model(input_ids=x).logits.float()
    return float((ours - theirs).abs().max())


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
    kw = {}
    if config_overrides:
        kw["config"] = transformers.AutoConfig.from_pretrained(str(path), **config_overrides)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw)
    except Exception as e:  # noqa: BLE001 - any load failure means the directory is not usable
        raise PicochatError(f"transformers cannot load {path}: {type(e).__name__}: {e}") from None
    return model.eval()
