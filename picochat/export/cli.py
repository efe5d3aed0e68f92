"""`picochat export hf`, `picochat import hf|nanochat`: move models to and from other ecosystems.

    picochat export hf --model sft/d4 --out hf/picochat-d4    picochat checkpoint -> transformers dir
    picochat import hf --path hf/picochat-d4 [--tag hf/d4]     transformers nanochat dir -> picochat tag
    picochat import nanochat --path DIR|org/name [--step N]    nanochat's own checkpoint -> picochat tag

The hf commands need transformers >= 5 (`pip install 'picochat[hf-export]'`). The work is in hf.py
and nanochat.py; these are thin wrappers that print a summary. picochat/cli.py wires them in through COMMAND_MODULES.
"""
from __future__ import annotations

import json

from picochat.common import nonneg_int, number_type
from picochat.export import DEFAULT_ATOL, DTYPE_NAMES

_pos_float = number_type(float, lambda v: 0 < v < float("inf"), "a finite number > 0")


def cmd_export_hf(args):
    """Write config.json, model.safetensors, tokenizer files with a chat template, generation_config.json
    and a README model card. transformers then reloads the directory and its logits must match
    picochat's, else nothing is written."""
    from picochat.export.hf import export_hf
    r = export_hf(args.model, args.out, step=args.step, dtype=args.dtype, atol=args.atol, force=args.force)
    print(f"exported {r['tag']} (step {r['step']}, {r['dtype'].removeprefix('torch.')}) -> {r['out']}: "
          f"transformers logits match picochat's to {r['max_abs_logit_diff']:.2g} (tolerance {r['atol']:g}) "
          f"on a {r['prompt_tokens']}-token prompt; tokenizer and chat template give identical ids")
    if "rope_table_drift_max_abs_logit_diff" in r:
        print(f"note: the source model (nanochat 2025) rounds its rotary tables to bfloat16; transformers computes "
              f"them in fp32, which moves logits by up to {r['rope_table_drift_max_abs_logit_diff']:.2g}")
    print(json.dumps(r))


def cmd_import_hf(args):
    """Convert a transformers 'nanochat' directory (config.json, safetensors, tokenizer.json) into a
    picochat checkpoint that carries the tokenizer, converted to picochat's format. picochat's logits
    must match transformers'."""
    from picochat.export.hf import import_hf
    r = import_hf(args.path, tag=args.tag, replace_tokenizer=args.replace_tokenizer, atol=args.atol)
    print(f"imported {args.path} -> tag {r['tag']} ({r['path']}, {r['dtype'].removeprefix('torch.')}): "
          f"picochat logits match transformers' to {r['max_abs_logit_diff']:.2g} (tolerance {r['atol']:g})")
    if "source_rms_norm_eps" in r:
        print(f"note: the source uses rms_norm_eps={r['source_rms_norm_eps']:g}; picochat's norms use float32 "
              f"machine epsilon (as nanochat), which moves logits by up to {r['eps_drift_max_abs_logit_diff']:.2g}")
    if r["replaced_tokenizer"]:
        print("note: it is also the home's default tokenizer now (used by `tokenizer eval` and new base runs); "
              "every checkpoint keeps its own")
    print(json.dumps(r))


def cmd_import_nanochat(args):
    """Convert nanochat's model_<step>.pt + meta_<step>.json and its tokenizer.pkl into an ordinary
    picochat checkpoint (safetensors + JSON, tokenizer included). Nothing from the files is executed:
    weights load with weights_only=True, the tokenizer pickle through an unpickler that admits only
    tiktoken's Encoding."""
    from picochat.export.nanochat import import_nanochat
    r = import_nanochat(args.path, step=args.step, tag=args.tag)
    print(f"imported nanochat {r['design']} design, step {r['step']} ({r['params']:,} params, {r['n_layer']} layers x "
          f"{r['n_embd']}, vocab {r['vocab_size']:,}) -> tag {r['tag']} ({r['path']}); try `picochat chat --model "
          f"{r['tag']}`")
    print(json.dumps(r))


def register(sub) -> None:
    # each command's docstring is its --help description (argparse reflows it into one paragraph)
    atol_help = "max |logit difference| the round-trip check accepts, fp32 (default %(default)g)"
    ex = sub.add_parser("export", help="export a checkpoint to another ecosystem").add_subparsers(
        dest="target", required=True)
    p = ex.add_parser("hf", help="write a Hugging Face transformers directory (model type nanochat)",
                      description=cmd_export_hf.__doc__)
    p.set_defaults(func=cmd_export_hf)
    p.add_argument("--model", default="sft/d4", help="checkpoint tag to export (default %(default)s)")
    p.add_argument("--step", type=nonneg_int, default=None, help="checkpoint step (unset: the latest)")
    p.add_argument("--out", required=True, help="output directory (created; must not exist unless --force)")
    p.add_argument("--dtype", default="checkpoint", choices=["checkpoint", *DTYPE_NAMES],
                   help="dtype of the exported weights; checkpoint = as stored (default %(default)s)")
    p.add_argument("--atol", type=_pos_float, default=DEFAULT_ATOL, help=atol_help)
    p.add_argument("--force", action="store_true", help="replace --out if it exists")

    im = sub.add_parser("import", help="import a model from another ecosystem").add_subparsers(
        dest="source", required=True)
    p = im.add_parser("hf", help="load a Hugging Face nanochat directory as a picochat checkpoint tag",
                      description=cmd_import_hf.__doc__)
    p.set_defaults(func=cmd_import_hf)
    p.add_argument("--path", required=True, help="the Hugging Face model directory (already downloaded)")
    p.add_argument("--tag", default=None, help="checkpoint tag to write (unset: hf/<directory name>)")
    p.add_argument("--replace-tokenizer", action="store_true",
                   help="also make it the home's default tokenizer ($PICOCHAT_HOME/tokenizer, used by `tokenizer "
                        "eval` and new base runs) when that one differs (unset: keep the home's)")
    p.add_argument("--atol", type=_pos_float, default=DEFAULT_ATOL, help=atol_help)

    p = im.add_parser("nanochat", help="load a checkpoint written by karpathy/nanochat (2025 or 2026 code) as a tag",
                      description=cmd_import_nanochat.__doc__)
    p.set_defaults(func=cmd_import_nanochat)
    p.add_argument("--path", required=True, help="a nanochat checkpoint folder (e.g. ~/.cache/nanochat/"
                   "chatsft_checkpoints/d20, tokenizer in ../../tokenizer; or model, meta and tokenizer.pkl in one "
                   "folder as on the hub), or a Hugging Face hub repo id such as karpathy/nanochat-d32 (downloaded)")
    p.add_argument("--step", type=nonneg_int, default=None, help="which model_<step>.pt (unset: the latest)")
    p.add_argument("--tag", default=None, help="checkpoint tag to write (unset: nanochat/<folder name>)")
