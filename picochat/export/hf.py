"""`picochat export hf` / `import hf`: picochat checkpoint <-> Hugging Face transformers `nanochat`
model directory (the mapping, and why the architectures match: export/hf_mapping.py).

Both directions run a logits check before anything is published: export writes into a temporary
directory next to --out and renames it into place only if transformers, loading that directory,
gives picochat's logits on a fixed prompt (and its tokenizer gives picochat's ids); import saves
the checkpoint only after the same comparison.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from picochat import checkpoint as ck
from picochat.common import PicochatError, home, replace_dir, tokenizer_dir, write_json_atomic
from picochat.export import DEFAULT_ATOL
from picochat.export import hf_tokenizer as hft
from picochat.export.hf_mapping import (CHECK_CONVERSATIONS, DTYPES, PADDED_ROWS, RMS_EPS, _load_hf_model,
                                        check_exportable, check_prompt, compare_logits, hf_config, picochat_config,
                                        quiet_transformers, require_transformers, weight_names)
from picochat.model.gpt import GPT
from picochat.tokenizer import Tokenizer


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
    try:
        raw = load_file(str(ckpt.path / "model.safetensors"))
    except Exception as e:  # noqa: BLE001 - safetensors has its own error types
        raise PicochatError(f"checkpoint {ckpt.path} has unreadable weights ({e})") from None
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

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
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
            if config.rope_table_dtype != "float32":  # the HF form computes its tables in fp32: compare with
                drift["rope_table_drift_max_abs_logit_diff"] = compare_logits(model, hf_model, ids)  # that,
                model.config = dataclasses.replace(config, rope_table_dtype="float32")              # report the
                model.reset_rotary()                                                                 # drift
            diff = compare_logits(model, hf_model, ids)
            problems = hft.check_hf_tokenizer(tok, AutoTokenizer.from_pretrained(str(tmp)), CHECK_CONVERSATIONS)
        if not diff <= atol:  # also catches NaN
            problems.insert(0, f"logits differ by {diff:.3g} > tolerance {atol:g} on a {len(ids)}-token prompt")
        if problems:
            raise PicochatError("export check failed, nothing written: " + "; ".join(problems))
        check = {"prompt_tokens": len(ids), "max_abs_logit_diff": diff, "atol": atol, "tokenizer": "identical ids",
                 **drift}
        (tmp / "README.md").write_text(model_card(
            tag, ckpt, tok, hf_cfg, n_params, check, _report_card(), tmp), encoding="utf-8")
        write_json_atomic(tmp / "picochat_export.json", {"tag": tag, "step": ckpt.step, "meta": ckpt.meta,
                                                         "picochat_config": config.to_dict(), "check": check})
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700 directories
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "tag": tag, "step": ckpt.step, "dtype": str(target), **check}


def _report_card() -> Path | None:
    p = home() / "report" / "report.md"
    return p if p.is_file() else None


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
    current = None
    if (tokenizer_dir() / "tokenizer.json").exists():
        current = Tokenizer.load(tokenizer_dir())

    raw = _read_hf_weights(path)
    names = {v: k for k, v in weight_names(config.n_layer).items()}
    raw = {k: v for k, v in raw.items() if not k.endswith("rotary_emb.inv_freq")}  # derived, old exports
    unexpected, missing = sorted(set(raw) - set(names)), sorted(set(names) - set(raw))
    if unexpected or missing:
        raise PicochatError(f"the weights in {path} do not fit a picochat model (unexpected "
                            f"{unexpected[:3]}, missing {missing[:3]})")
    dtypes = {t.dtype for t in raw.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    try:
        model.load_state_dict({names[k]: v for k, v in raw.items()})
    except RuntimeError as e:
        why = str(e).splitlines()[-1].strip()
        raise PicochatError(f"the weights in {path} do not fit their config ({why})") from None
    model.reset_rotary()
    model.eval()

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

    source = {}
    if (path / "picochat_export.json").is_file():  # a picochat export: keep its training facts
        source = json.loads((path / "picochat_export.json").read_text())
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
