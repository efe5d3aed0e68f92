"""The report card's PNG plots (matplotlib, optional: pip install 'picochat[plot]'): training loss and
val bpb per stage, RL reward/length/speed per run, eval accuracy bars. Each is written atomically;
a plot with nothing to show is not written (its function returns False)."""
from __future__ import annotations

from pathlib import Path

from picochat.common import atomic_path

STAGES = ("base", "mid", "sft", "rl")
SMOOTH = 10  # steps averaged in the RL plot
RL_PANELS = (("reward", "reward / pass rate", ("reward", "pass_")), ("reply length", "tokens", ("response_len",)),
             ("rollout speed", "tokens/s", ("rollout_tok_per_s",)), ("calculator", "answer == result (share)",
                                                                     ("calc_agree",)))


def write_plots(all_runs: list[dict], eval_rows: list[dict], out: Path) -> dict[str, bool]:
    """Every plot into out/; {name: written}. Without matplotlib: {}."""
    try:
        import matplotlib
    except ImportError:
        return {}
    matplotlib.use("Agg")
    return {"loss": plot_curves(all_runs, "loss", "training loss", out / "loss.png"),
            "val_bpb": plot_curves(all_runs, "val_bpb", "val bits per byte", out / "val_bpb.png"),
            "evals": plot_evals(eval_rows, out / "evals.png"),
            "rl": plot_rl(all_runs, out / "rl.png")}


def _subplots(*args, **kwargs):
    import matplotlib.pyplot as plt
    return plt.subplots(*args, **kwargs)


def _save(fig, path: Path) -> bool:
    import matplotlib.pyplot as plt
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_curves(all_runs: list[dict], key: str, ylabel: str, path: Path) -> bool:
    stages = [s for s in STAGES if any(r["stage"] == s and any(key in h and h[key] is not None for h in r["history"])
                                       for r in all_runs)]
    if not stages:
        return False
    fig, axes = _subplots(1, len(stages), figsize=(4.5 * len(stages), 3.4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for r in all_runs:
            pts = [(h["step"], h[key]) for h in r["history"] if r["stage"] == stage and h.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o" if len(pts) < 8 else None, markersize=3, label=r["tag"])
        ax.set(title=stage, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_rl(all_runs: list[dict], path: Path) -> bool:
    """One row of panels per RL run's history (`picochat train rl` logs these keys per step)."""
    rl = [r for r in all_runs if r["stage"] == "rl" and any("reward" in h for h in r["history"])]
    if not rl:
        return False
    fig, axes = _subplots(1, len(RL_PANELS), figsize=(4.2 * len(RL_PANELS), 3.2), squeeze=False)
    for ax, (title, ylabel, prefixes) in zip(axes[0], RL_PANELS):
        for r in rl:
            keys = sorted({k for h in r["history"] for k in h if k.startswith(prefixes)})
            if sum(k.startswith("pass_") for k in keys) == 1:  # one task: its pass rate is the reward
                keys = [k for k in keys if not k.startswith("pass_")]
            for k in keys:
                pts = [(h["step"], h[k]) for h in r["history"] if h.get(k) is not None]
                # per-step values of 64-128 samples are noisy: a trailing mean over SMOOTH steps shows the trend
                ys = [sum(y for _, y in pts[max(0, i - SMOOTH + 1):i + 1]) / (i + 1 - max(0, i - SMOOTH + 1))
                      for i in range(len(pts))]
                ax.plot([x for x, _ in pts], ys, label=f"{r['tag']} {k}" if len(keys) > 1 else r["tag"])
        ax.set(title=f"{title} ({SMOOTH}-step mean)", xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    return _save(fig, path)


def plot_evals(rows: list[dict], path: Path) -> bool:
    rows = [r for r in rows if r["metric"] not in ("bpb", "CORE")]  # not accuracies
    if not rows:
        return False
    labels = [f"{r['task']} · {r['model']}" for r in rows]
    fig, ax = _subplots(figsize=(7, 0.35 * len(rows) + 1.2))
    ax.barh(range(len(rows)), [100 * r["value"] for r in rows], color="#4c72b0")
    for i, r in enumerate(rows):
        if r.get("chance") is not None:
            ax.plot([100 * r["chance"]] * 2, [i - 0.4, i + 0.4], color="#c44e52", lw=1.5)
        ax.text(100 * r["value"] + 0.5, i, f"{100 * r['value']:.1f}%", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 105)
    ax.set_xlabel("accuracy / pass@1 (%)   (red tick: chance)")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)
