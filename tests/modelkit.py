"""Random models for the inference tests: every weight random (so greedy outputs are varied), and
nanochat-2026 scalars (resid/x0 lambdas, smear, backout) at values where each feature matters."""
import torch

from picochat.model.config import GPTConfig, config_from_depth
from picochat.model.gpt import GPT


def random_gpt(cfg: GPTConfig, seed: int = 0, std: float = 0.3) -> GPT:
    torch.manual_seed(seed)
    model = GPT(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=std)
    with torch.no_grad():
        if cfg.layer_scalars:
            model.resid_lambdas.copy_(1 + 0.1 * torch.randn(cfg.n_layer))
            model.x0_lambdas.fill_(0.3)
        if cfg.smear:
            model.smear_lambda.fill_(0.8)
        if cfg.backout:
            model.backout_lambda.fill_(0.3)
    return model.eval()


def random_model(vocab: int = 256, seed: int = 0, depth: int = 2, std: float = 0.3, seq_len: int = 64,
                 n_embd: int | None = None, **cfg) -> GPT:
    """The tests' one random model: `config_from_depth(depth)` 32 wide per layer (or `n_embd`), 16-dim heads,
    `cfg` passed on (attention, n_kv_head, ...), every weight ~ N(0, std) (random_gpt)."""
    cfg.setdefault("head_dim", 16)
    config = config_from_depth(depth, vocab_size=vocab, sequence_len=seq_len,
                               aspect_ratio=n_embd // depth if n_embd else 32, **cfg)
    return random_gpt(config, seed, std)
