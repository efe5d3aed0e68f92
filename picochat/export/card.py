"""The README.md model card of a Hugging Face export: what the model is and how it was trained.

Facts come from the checkpoint (config, meta.json: stage, steps, tokens, val bpb, training time,
settings), eval results saved next to it (eval_*.json), and the picochat report card
($PICOCHAT_HOME/report/report.md) when one exists: it is copied into the export (with its plots)
and linked. Nothing here is invented: a fact the checkpoint does not record is left out.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from picochat.checkpoint import Checkpoint
from picochat.tokenizer import Tokenizer

USAGE = '''```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("{path}")
model = AutoModelForCausalLM.from_pretrained("{path}")
ids = tok.apply_chat_template([{{"role": "user", "content": "Hello!"}}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=64, do_sample=False)
print(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
```'''


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.0f}" if v.is_integer() else f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _training_rows(meta: dict, state: dict) -> list[tuple[str, object]]:
    losses = [h["loss"] for h in state.get("history") or [] if isinstance(h, dict) and h.get("loss") is not None]
    rows = [("stage", meta.get("stage")), ("optimizer steps", meta.get("step")),
            ("training tokens", meta.get("tokens")), ("last training loss", losses[-1] if losses else None),
            ("validation bits per byte", meta.get("val_bpb")),
            ("training time (s)", meta.get("train_time")), ("device", meta.get("device")),
            ("processes", meta.get("world_size"))]
    settings = meta.get("settings") or {}
    for key in ("seq_len", "total_batch_size", "matrix_lr", "embedding_lr", "unembedding_lr", "seed"):
        if settings.get(key) not in (None, -1):  # -1: "derived" (e.g. one micro-batch), not a fact
            rows.append((key, settings[key]))
    for key, value in sorted((settings.get("extra") or {}).items()):
        if isinstance(value, (str, int, float)):
            rows.append((key, value))
    return [(k, v) for k, v in rows if v is not None]


def _eval_sections(ckpt: Checkpoint) -> list[str]:
    lines = []
    for f in sorted(ckpt.path.parent.glob("eval*.json")):
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        lines.append(f"- `{f.name}`: " + json.dumps(data.get("results", data), sort_keys=True)[:600])
    return lines


def copy_report(report: Path, out_dir: Path) -> str:
    """Copy the report card (and the images next to it) into out_dir/report/; return its link."""
    dest = out_dir / "report"
    dest.mkdir(exist_ok=True)
    for f in report.parent.iterdir():
        if f.is_file() and (f == report or f.suffix.lower() in (".png", ".svg", ".jpg")):
            shutil.copy2(f, dest / f.name)
    return f"report/{report.name}"


def quote_report(text: str, tag: str) -> list[str]:
    """The report card's table rows about `tag` (rows naming it as `tag`), each under its section
    heading and table header: the facts about this model, without the rest of the home's runs."""
    out, section, header, shown = [], None, None, set()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("#"):
            section, header = line.lstrip("#").strip(), None
        elif line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            header = [line, lines[i + 1]]
        elif line.startswith("|") and f"`{tag}`" in line and header:
            if (section, header[0]) not in shown:
                out += ["", f"**{section}**", ""] if section else [""]
                out += header
                shown.add((section, header[0]))
            out.append(line)
    return out


def model_card(tag: str, ckpt: Checkpoint, tok: Tokenizer, hf_cfg, n_params: int, check: dict,
               report: Path | None, out_dir: Path) -> str:
    c, meta = ckpt.config, ckpt.meta
    source = meta.get("source_meta") if meta.get("stage") == "import" else None
    facts = _training_rows(source or meta, {} if source else ckpt.state)
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- picochat", "- nanochat",
        "---", "",
        f"# picochat `{tag}` (step {ckpt.step})", "",
        "A small chat model trained end to end with picochat and exported with "
        "`picochat export hf`. It loads with plain `transformers` (>= 5, model type `nanochat`), no remote code.",
        "", "## Usage", "", USAGE.format(path="PATH_OR_REPO"), "",
        "## Architecture", "",
        "| | |", "|---|---|",
        f"| parameters | {n_params:,} |", f"| layers | {c.n_layer} |", f"| width | {c.n_embd} |",
        f"| attention heads / KV heads | {c.n_head} / {c.n_kv_head} ({'GQA' if c.n_kv_head < c.n_head else 'MHA'}) |",
        f"| head dim | {c.head_dim} |", f"| vocabulary | {c.vocab_size:,} (tokenizer {tok.vocab_size:,}) |",
        f"| context trained | {c.sequence_len} |", f"| rotary base | {_fmt(c.rope_base)} |",
        f"| logit soft-cap | {_fmt(c.softcap) if c.softcap else 'off'} |",
        f"| weights dtype | {hf_cfg.dtype} |", "",
        "Rotary embeddings, QK-norm, relu² MLP, parameter-free RMSNorm (also right after the embedding), "
        "no biases, untied embedding and lm_head.", "",
        "## Training", "",
    ]
    if facts:
        lines += ["| | |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in facts] + [""]
    else:
        lines += ["The checkpoint records no training facts.", ""]
    evals = _eval_sections(ckpt)
    if evals:
        lines += ["## Evaluation", ""] + evals + [""]
    if report is not None:
        link = copy_report(report, out_dir)
        quoted = quote_report(report.read_text(encoding="utf-8", errors="replace"), tag)
        lines += ["## Report card", "", f"From picochat's report card ([{link}]({link}), with plots):"]
        lines += quoted + [""] if quoted else [f"(it has no rows about `{tag}`)", ""]
    lines += [
        "## Chat format", "",
        "`<|bos|>` then per turn `<|user_start|>…<|user_end|>` and `<|assistant_start|>…<|assistant_end|>`; "
        "a system message is prepended to the first user message with a blank line. Tool calls are "
        "`<|python_start|>…<|python_end|>`, tool output `<|output_start|>…<|output_end|>`. The chat template "
        "reproduces picochat's `render_conversation` token for token. Unlike picochat, the HF tokenizer "
        "turns special-token strings typed inside user text into special tokens.", "",
        "## Export check", "",
        f"At export, transformers' logits on a {check['prompt_tokens']}-token prompt matched picochat's to "
        f"{check['max_abs_logit_diff']:.2g} (tolerance {check['atol']:g}, fp32), and the tokenizer and chat "
        "template gave picochat's token ids.", "",
    ]
    return "\n".join(lines)
