"""Moving picochat models to and from other ecosystems.

hf.py            checkpoint <-> Hugging Face transformers `nanochat` directory: the config and weight
                 mapping, what cannot be exported, the logits check (export_hf, import_hf)
hf_tokenizer.py  picochat BPE <-> `tokenizer.json` + the chat template
card.py          the exported README model card
nanochat.py      `picochat import nanochat`: nanochat's own checkpoints
cli.py           `picochat export hf` / `picochat import hf|nanochat`

Kept import-light (no torch here): the CLI reads these defaults when it builds its parser.
"""

# fp32 logits of one model through two implementations differ by float rounding only (~1e-6
# measured on the test models); 1e-3 absolute (logits live in [-15, 15]) fails any real mapping error.
DEFAULT_ATOL = 1e-3
DTYPE_NAMES = ("float32", "bfloat16", "float16")
