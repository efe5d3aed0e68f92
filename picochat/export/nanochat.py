"""`picochat import nanochat`: a checkpoint written by karpathy/nanochat -> an ordinary picochat tag.

    picochat import nanochat --path ~/.cache/nanochat/chatsft_checkpoints/d20 [--step N] [--tag TAG]
    picochat import nanochat --path karpathy/nanochat-d32          (a Hugging Face hub repo, online)

A nanochat checkpoint folder holds `model_<step>.pt` (the state_dict) and `meta_<step>.json`
(`model_config` = nanochat's GPTConfig fields); its `tokenizer.pkl` lies in the same folder (the hub
layout) or in `../../tokenizer` (nanochat's base dir). Two designs, 2025 (c6abcdf) and 2026 (a825e63
and later), are recognised by their weights and each is rebuilt exactly (the differences:
docs/nanochat.md; logits equal to nanochat's own forward: tests/test_nanochat_import.py). A checkpoint
from between the two mixes features this importer cannot date, and is refused by name rather than
loaded approximately.

Nothing from the files is executed: weights go through torch.load(weights_only=True), and the
tokenizer pickle through an unpickler that admits exactly one class, tiktoken's Encoding, whose
state (name, pattern, ranks, special tokens) is read as plain data and validated before use.
"""
from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path

import torch

from picochat import checkpoint as ck
from picochat.common import PicochatError
from picochat.model.config import GPTConfig, nanochat_short_window
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer

MODEL_RE = re.compile(r"^model_(\d+)\.pt$")
HUB_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
HUB_FILES = ["model_*.pt", "meta_*.json", "tokenizer.pkl", "token_bytes.pt", "*.md"]
DESIGN_2026_KEYS = {"smear_gate.weight", "smear_lambda", "backout_lambda"}
MIDDLE_KEYS = {"resid_lambdas", "x0_lambdas"}  # also in 2026; alone they date a checkpoint between the two


# ----------------------------------------------------------------------------- the tokenizer pickle

class _EncodingState:
    """Stands in for tiktoken.core.Encoding while unpickling: it records the pickled state (a dict)
    instead of constructing anything, so no code of the file's choosing can run."""

    def __setstate__(self, state):
        self.state = state


class _TokenizerUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingState
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, and a nanochat tokenizer may only hold a "
                                     "tiktoken.core.Encoding")


def read_tokenizer_pickle(path: Path) -> Tokenizer:
    """nanochat's tokenizer.pkl -> picochat Tokenizer, without executing anything from the file."""
    try:
        obj = _TokenizerUnpickler(io.BytesIO(Path(path).read_bytes())).load()
    except OSError as e:
        raise PicochatError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001 - any malformed or hostile pickle is the same error to the user
        raise PicochatError(f"refusing {path}: not a plain nanochat tokenizer pickle ({e})") from None
    state = getattr(obj, "state", None)
    state = state if isinstance(state, dict) else {}
    ranks, pattern, specials = state.get("mergeable_ranks"), state.get("pat_str"), state.get("special_tokens")
    if (not isinstance(ranks, dict) or not isinstance(pattern, str) or not isinstance(specials, dict)
            or not all(isinstance(k, bytes) and type(v) is int for k, v in ranks.items())):
        raise PicochatError(f"refusing {path}: not a tiktoken Encoding with byte ranks, a pattern and special tokens")
    expected = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    if specials != expected:
        raise PicochatError(f"{path} has special tokens {sorted(specials)[:4]}...; picochat needs nanochat's nine "
                            f"chat tokens right after the {len(ranks)} ranks")
    try:
        return Tokenizer(ranks, pattern)
    except ValueError as e:
        raise PicochatError(f"{path} is not a usable tokenizer: {e}") from None


# ----------------------------------------------------------------------------- finding the files

def find_files(path: Path, step: int | None) -> tuple[Path, Path, Path, int]:
    """(model_XXXXXX.pt, meta_XXXXXX.json, tokenizer.pkl, step) of a nanochat checkpoint folder."""
    if not path.is_dir():
        raise PicochatError(f"{path} is not a directory (expected a nanochat checkpoint folder or a hub repo id "
                            "such as karpathy/nanochat-d32)")
    models = {int(m.group(1)): p for p in path.iterdir() if (m := MODEL_RE.match(p.name))}
    steps = sorted(models)
    if not steps:
        hint = "; it looks like a Hugging Face transformers folder: use `picochat import hf`" \
            if (path / "config.json").is_file() else ""
        raise PicochatError(f"{path} has no model_<step>.pt: not a nanochat checkpoint folder{hint}")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise PicochatError(f"{path} has no step {step}; it has steps {', '.join(map(str, steps))}")
    model_file = models[step]
    meta_file = path / model_file.name.replace("model_", "meta_").replace(".pt", ".json")
    if not meta_file.is_file():
        raise PicochatError(f"{path} has {model_file.name} but no {meta_file.name}")
    for folder in (path, path.parent.parent / "tokenizer"):
        if (folder / "tokenizer.pkl").is_file():
            return model_file, meta_file, folder / "tokenizer.pkl", step
    raise PicochatError(f"no tokenizer.pkl next to {model_file.name} (the hub layout) or in "
                        f"{path.parent.parent / 'tokenizer'} (nanochat's base-dir layout)")


def download_from_hub(repo_id: str) -> Path:
    """The repo's checkpoint and tokenizer files, from the Hugging Face hub (or its local cache)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise PicochatError("importing from the hub needs huggingface_hub: pip install huggingface_hub") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated repo: one line each
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PicochatError(f"cannot download {repo_id} from the Hugging Face hub ({type(e).__name__}: {why[:200]}); "
                            "offline, pass the downloaded folder instead") from None


# ----------------------------------------------------------------------------- weights and config

def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors, memory-mapped where the file allows (torch.save's zip format): the import
    then holds the weights once, as file pages, instead of reading a second copy into memory."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # only the legacy (pre-zip) format cannot be mapped
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, a pickle with code in it, not a torch file
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise PicochatError(f"cannot read {path} as plain weights ({why})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise PicochatError(f"{path} is not a state_dict of tensors")
    # torch.compile'd models save their weights under _orig_mod. (nanochat strips it on load too)
    return {k.removeprefix("_orig_mod."): v for k, v in state.items()}


def nanochat_config(meta: dict, state: dict[str, torch.Tensor], source: Path) -> tuple[GPTConfig, str]:
    """picochat's GPTConfig for a nanochat checkpoint, and the design's name ("2025" or "2026")."""
    mc = meta.get("model_config")
    need = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")
    if not isinstance(mc, dict) or any(type(mc.get(k)) is not int for k in need):
        raise PicochatError(f"{source} has no model_config with integer {', '.join(need)}")
    keys = set(state)
    ve_keys = {k for k in keys if k.startswith("value_embeds.")}
    if DESIGN_2026_KEYS <= keys:
        design = "2026"
        seq = mc["sequence_len"]
        fields = dict(value_embeds=bool(ve_keys), layer_scalars=bool(MIDDLE_KEYS & keys),
                      smear=True, backout=True, window_pattern=str(mc.get("window_pattern", "SSSL")) or "L",
                      short_window=nanochat_short_window(seq), qk_scale=1.2, rope_base=100000.0, pad_vocab_to=64)
    elif DESIGN_2026_KEYS & keys or MIDDLE_KEYS & keys or ve_keys:
        found = sorted((DESIGN_2026_KEYS | MIDDLE_KEYS) & keys | ve_keys)
        raise PicochatError(f"{source} is from a nanochat version between the 2025 (c6abcdf) and 2026 (a825e63+) "
                            f"designs (it has {', '.join(found[:4])} but not all of smear_gate/backout): picochat "
                            "imports those two designs only")
    else:
        design = "2025"
        wte = state.get("transformer.wte.weight")
        padded = wte is not None and wte.size(0) != mc["vocab_size"]
        fields = dict(rope_table_dtype="bfloat16", pad_vocab_to=64 if padded else 1)
    try:
        config = GPTConfig(**{k: mc[k] for k in need}, **fields)
    except ValueError as e:
        raise PicochatError(f"{source}: unsupported model_config ({e})") from None
    return config, design


# ----------------------------------------------------------------------------- the command

def import_nanochat(path: str, step: int | None = None, tag: str | None = None) -> dict:
    """Save nanochat checkpoint `path` (a folder, or a hub repo id) as picochat tag `tag`."""
    local = Path(path).expanduser()
    if not local.exists() and HUB_RE.match(path):
        local = download_from_hub(path)
    local = local.resolve()
    if step is not None and step < 0:
        raise PicochatError(f"--step must be >= 0, got {step}")
    model_file, meta_file, tok_file, step = find_files(local, step)
    tag = tag or f"nanochat/{local.name}"
    ck.tag_dir(tag)  # a bad tag fails before the slow part
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as e:
        raise PicochatError(f"{meta_file} is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise PicochatError(f"{meta_file} is not a JSON object")
    tok = read_tokenizer_pickle(tok_file)
    state = read_state_dict(model_file)
    config, design = nanochat_config(meta, state, model_file)
    if tok.vocab_size != config.vocab_size:
        raise PicochatError(f"{tok_file} has {tok.vocab_size} tokens but the model's vocab_size is "
                            f"{config.vocab_size}: they are not from the same run")
    misfit = f"the weights in {model_file} do not fit a nanochat model of their model_config"
    model = ck.build_model(config, state, misfit)
    logits = model(torch.tensor([tok.encode("Hello", prepend=tok.bos_token_id)]))
    if not torch.isfinite(logits).all():
        raise PicochatError(f"the weights in {model_file} give non-finite logits")
    dtypes = {t.dtype for t in state.values()}
    if len(dtypes) == 1:  # keep a uniformly-bf16 checkpoint bf16; mixed dtypes are stored in fp32
        model.to(dtypes.pop())
    info = {k: meta[k] for k in ("step", "val_bpb", "model_config", "user_config") if k in meta}
    saved = ck.save_checkpoint(tag, step, model, config,
                               {"stage": "import", "source": str(local), "nanochat_design": design,
                                "nanochat_meta": info, "tokenizer_vocab": tok.vocab_size}, tokenizer=tok)
    return {"tag": tag, "path": str(saved), "step": step, "design": design, "source": str(local),
            "params": model.num_params(), "vocab_size": config.vocab_size, "n_layer": config.n_layer,
            "n_embd": config.n_embd, "sequence_len": config.sequence_len}
