"""The report card: one Markdown file (plus PNG plots) summing up everything under $PICOCHAT_HOME.

    $PICOCHAT_HOME/report/report.md      hardware, data, tokenizer, training, evals, wall times, cost
    $PICOCHAT_HOME/report/loss.png       training loss per stage (one line per checkpoint tag)
    $PICOCHAT_HOME/report/val_bpb.png    validation bits per byte per stage
    $PICOCHAT_HOME/report/evals.png      accuracy bars per task and model
    $PICOCHAT_HOME/report/rl.png         RL runs: reward and pass rates, reply length, rollout tokens/s

Everything is read from what the other commands already wrote: data/*/meta.json, the tokenizer,
checkpoints' meta.json (stage, params, tokens, val bpb, train time) and state.json (the run
history), eval_*.json next to checkpoints (`picochat eval`), and quickstart_times.tsv (per-stage
wall times written by quickstart.sh). A missing piece is reported as missing, never invented.
Plots need matplotlib (optional: pip install 'picochat[plot]'); a plot with nothing to show is not
written. Cost = hours x --dollars-per-hour (wall time of the quickstart stages when present, else
the sum of training times). Each file is written atomically.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from picochat.common import PicochatError, atomic_path, data_dir, home, tokenizer_dir, write_text_atomic


# --------------------------------------------------------------------------- gathering

ISA_NAMES = {"AVX512": "AVX-512", "AVX2": "AVX2", "DEFAULT": "no vector kernels (DEFAULT)"}


def _cpuinfo() -> tuple[str | None, set[str]]:
    """(model name, flags) of the first CPU in /proc/cpuinfo; (None, set()) where there is none (macOS)."""
    model, flags = None, set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model is None:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    return model, flags


def cpu_isa(capability: str, flags: set[str], forced: str | None = None) -> str:
    """The vector instruction set torch's CPU kernels use (its capability), and AMX on x86.

    Timings differ by class (AVX2 vs AVX-512 vs AMX), so the report names it. ATEN_CPU_CAPABILITY
    (`forced`) makes torch use a lower set than the CPU has: then both are named.
    """
    out = ISA_NAMES.get(capability, capability)
    best = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    if forced and best and best != out:
        out += f" (ATEN_CPU_CAPABILITY={forced}; the CPU has {best})"
    if "avx" in flags:  # x86: AMX (Sapphire Rapids and later) speeds up bf16/int8 matmuls beyond AVX-512
        out += f", AMX: {'yes' if 'amx_tile' in flags else 'no'}"
    return out


def hardware() -> dict:
    model, flags = _cpuinfo()
    info = {"cpu": model or platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "cpu_isa": cpu_isa(torch.backends.cpu.get_cpu_capability(), flags, os.environ.get("ATEN_CPU_CAPABILITY")),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}
    with contextlib.suppress(ValueError, OSError, AttributeError):
        info["memory_gib"] = round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1)
    if torch.cuda.is_available():
        info["gpu"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    else:
        info["gpu"] = "none"
    return info


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def corpora(root: Path) -> list[dict]:
    out = []
    for meta in sorted((root / "data").glob("*/meta.json")):
        m = _read_json(meta)
        if isinstance(m, dict):
            out.append({"name": meta.parent.name, **m})
    return out


def tokenizer_info(corpus: str | None) -> dict | None:
    from picochat.tokenizer import Tokenizer
    try:
        tok = Tokenizer.load(tokenizer_dir())
    except PicochatError:
        return None
    info = {"vocab_size": tok.vocab_size}
    if corpus:  # compression on (the start of) the val split: cheap, and what the bpb numbers sit on
        from picochat.data.corpus import sample_texts
        try:
            texts = sample_texts(data_dir(corpus), "val", 200_000)
        except (PicochatError, OSError):
            texts = []
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        if n_bytes:
            n_tok = sum(len(ids) for ids in tok.encode(texts))
            info.update(corpus=corpus, bytes_per_token=n_bytes / max(1, n_tok), sample_bytes=n_bytes)
    return info


def runs() -> list[dict]:
    """Latest checkpoint of every tag, with its history and eval results."""
    from picochat import checkpoint as ck
    out = []
    for tag in ck.list_tags():
        try:
            c = ck.read_checkpoint(tag, verify=False)
        except PicochatError:
            continue
        evals = [{"kind": e.get("kind", "chat"), "step": e.get("step"), "results": e["results"]}
                 for e in map(_read_json, sorted(c.path.parent.glob("eval_*.json")))
                 if isinstance(e, dict) and isinstance(e.get("results"), dict)]
        extra = c.meta.get("settings", {}).get("extra", {})
        out.append({"tag": tag, "stage": c.meta.get("stage", tag.split("/")[0]), "step": c.step,
                    "params": c.meta.get("num_params"), "tokens": c.meta.get("tokens"),
                    "train_time": c.meta.get("train_time"), "val_bpb": c.meta.get("val_bpb"),
                    "source": extra.get("source"), "heldout_before": extra.get("heldout_before"),
                    "config": c.config.to_dict(), "history": c.state.get("history", []), "evals": evals})
    return out


TIMES_FILES = ("quickstart_times.tsv", "gpu_speedrun_times.tsv")  # stage <TAB> seconds, by the two pipelines


def wall_times(root: Path) -> list[tuple[str, float]]:
    """Per-stage wall times of the newest pipeline run in this home (CPU quickstart or GPU speedrun)."""
    files = [root / name for name in TIMES_FILES if (root / name).is_file()]
    try:
        lines = max(files, key=lambda f: f.stat().st_mtime).read_text().splitlines() if files else []
    except OSError:
        return []
    rows = []
    for parts in (line.split("\t") for line in lines):
        try:
            rows.append((parts[0], float(parts[1])))
        except (IndexError, ValueError):
            continue
    return rows


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


# --------------------------------------------------------------------------- plots

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
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages), 3.4), squeeze=False)
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
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(RL_PANELS), figsize=(4.2 * len(RL_PANELS), 3.2), squeeze=False)
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
    # one task can have several bars (pass@1, answer == calculator result, pass@k): each names its metric
    labels = [f"{r['task']} {r['metric']} · {r['model']}" for r in rows]
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
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


# --------------------------------------------------------------------------- markdown

def rl_lines(all_runs: list[dict], plotted: bool) -> list[str]:
    """The RL section: held-out metrics before (the starting checkpoint) and after each RL run."""
    rl = [r for r in all_runs if r["stage"] == "rl"]
    if not rl:
        return []
    L = ["## Reinforcement learning", ""]
    rows = []
    for r in rl:
        after = next((h for h in reversed(r["history"]) if any(k.startswith("heldout_") for k in h)), {})
        before = r.get("heldout_before") or {}
        for k in sorted(set(before) | {k for k in after if k.startswith("heldout_")}):
            rows.append([f"`{r['tag']}`", _fmt(r["source"]), k.removeprefix("heldout_"),
                         _fmt(before.get(k), ".1%"), _fmt(after.get(k), ".1%")])
    if rows:
        L += _table(["run", "from", "held-out (greedy)", "before", "after"], rows) + [""]
    if plotted:
        L += ["![RL](rl.png)", ""]
    return L


def _fmt(v, spec: str = "") -> str:
    return "–" if v is None else format(v, spec)  # format(v, "") is str(v)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            + ["| " + " | ".join(r) + " |" for r in rows])


def eval_rows(all_runs: list[dict]) -> list[dict]:
    rows = []
    for r in all_runs:
        for e in r["evals"]:
            for task, res in sorted(e["results"].items()):
                base = {"model": r["tag"], "kind": e["kind"], "task": task, "n": res.get("n"),
                        "chance": res.get("chance")}
                if res.get("kind") in ("bpb", "core"):  # one number each; CORE's tasks get their own section
                    rows.append({**base, "metric": res["kind"].replace("core", "CORE"), "value": res.get(res["kind"])})
                    continue
                metric = "pass@1" if res.get("kind") == "generative" else "accuracy"
                rows.append({**base, "metric": metric, "value": res.get("accuracy", 0.0)})
                for k in sorted(x for x in res if x.startswith(("pass@", "maj@")) and x != "pass@1"):
                    rows.append({**base, "metric": k, "value": res[k], "chance": None})
                if "tool_copy" in res:  # of the replies with a calculator result, the answer repeats it
                    rows.append({**base, "metric": "answer == calculator result", "value": res["tool_copy"],
                                 "n": res["tool_results"], "chance": None})
    return rows


def core_lines(all_runs: list[dict]) -> list[str]:
    """CORE (`picochat eval base --tasks core`): the score and every task's accuracy and centered accuracy."""
    L = []
    for r in all_runs:
        for e in r["evals"]:
            res = e["results"].get("core")
            if not isinstance(res, dict) or not isinstance(res.get("tasks"), dict):
                continue
            L += [f"`{r['tag']}` (step {_fmt(e['step'])}): **{res.get('name', 'CORE')} = {res.get('core', 0.0):.4f}** "
                  f"(mean centered accuracy; source: {res.get('source', '?')}).", ""]
            L += _table(["task", "type", "shots", "n", "accuracy", "random baseline", "centered"], [
                [label, str(t.get("type")), _fmt(t.get("shots")), _fmt(t.get("n")), f"{100 * t['accuracy']:.1f}%",
                 f"{100 * t['baseline']:.1f}%", f"{t['centered']:+.4f}"] for label, t in res["tasks"].items()]) + [""]
    if L:
        L = ["## CORE", "", "centered = (accuracy - random baseline) / (1 - random baseline); CORE = the mean over "
             "tasks (DCLM's metric, as nanochat reports it; see docs/eval.md).", ""] + L
    return L


def render(root: Path, all_runs: list[dict], dollars_per_hour: float, plots: dict[str, bool]) -> str:
    hw = hardware()
    data = corpora(root)
    evals = eval_rows(all_runs)
    times = wall_times(root)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commit = _git_commit()
    L = ["# picochat report card", "",
         f"Generated {now}{f' at commit {commit}' if commit else ''} from `{root}`.", ""]

    L += ["## Hardware", ""] + _table(["", ""], [
        ["CPU", f"{hw['cpu']} ({hw['cores']} cores)"], ["CPU instruction set (torch's kernels)", hw["cpu_isa"]],
        ["memory", f"{_fmt(hw.get('memory_gib'))} GiB"],
        ["GPU", hw["gpu"] + (f" ({hw['gpu_memory_gib']} GiB)" if "gpu_memory_gib" in hw else "")],
        ["torch / python", f"{hw['torch']} / {hw['python']}"], ["platform", hw["platform"]]]) + [""]

    L += ["## Data", ""]
    if data:
        L += _table(["corpus", "source", "train docs", "train chars", "val docs", "val chars"], [
            [d["name"], str(d.get("source", "–")), _fmt(d.get("train_docs"), ","), _fmt(d.get("train_chars"), ","),
             _fmt(d.get("val_docs"), ","), _fmt(d.get("val_chars"), ",")] for d in data]) + [""]
    else:
        L += ["No prepared corpus (`picochat data prepare`).", ""]

    tok = tokenizer_info(data[0]["name"] if data else None)
    L += ["## Tokenizer", ""]
    if tok is None:
        L += ["No tokenizer (`picochat tokenizer train`).", ""]
    else:
        line = f"Vocabulary {tok['vocab_size']:,} tokens"
        if "bytes_per_token" in tok:
            line += (f"; {tok['bytes_per_token']:.2f} bytes/token on the first {tok['sample_bytes']:,} bytes of "
                     f"the `{tok['corpus']}` val split")
        L += [line + ".", ""]

    L += ["## Training", ""]
    if all_runs:
        rows = []
        for r in all_runs:
            losses = [h["loss"] for h in r["history"] if h.get("loss") is not None]
            cfg = r["config"]
            rows.append([f"`{r['tag']}`", r["stage"], _fmt(r["source"]), f"d{cfg.get('n_layer')} x {cfg.get('n_embd')}",
                         _fmt(r["params"], ","), _fmt(r["step"]), _fmt(r["tokens"], ","),
                         _fmt(r["train_time"], ".1f") + " s" if r["train_time"] is not None else "–",
                         _fmt(losses[-1] if losses else None, ".3f"), _fmt(r["val_bpb"], ".4f")])
        L += _table(["tag", "stage", "from", "model", "params", "steps", "tokens", "train time", "last loss",
                     "val bpb"], rows)
        L += ["", "val bpb: base on the corpus's val split; mid/SFT on held-out spelling/arithmetic conversations "
                  "(not comparable across the two).", ""]
        for name, what in (("loss", "Training loss"), ("val_bpb", "Validation bits per byte")):
            if plots.get(name):
                L += [f"![{what}]({name}.png)", ""]
    else:
        L += ["No checkpoints yet (`picochat train base`).", ""]

    L += rl_lines(all_runs, plots.get("rl", False))
    L += ["## Evaluations", ""]
    if evals:
        L += _table(["model", "as", "task", "metric", "value", "n", "chance"], [
            [f"`{e['model']}`", e["kind"], e["task"], e["metric"],
             f"{e['value']:.4f}" if e["metric"] in ("bpb", "CORE") else f"{100 * e['value']:.1f}%", _fmt(e["n"]),
             _fmt(e.get("chance"), ".1%")] for e in evals]) + [""]
        if plots.get("evals"):
            L += ["![Evaluations](evals.png)", ""]
    else:
        L += ["No eval results yet (`picochat eval base|chat`).", ""]
    L += core_lines(all_runs)

    L += ["## Wall times", ""]
    total_s = sum(t for _, t in times)
    if times:
        L += [f"CPU: {hw['cpu']} ({hw['cores']} cores, {hw['cpu_isa']}); GPU: {hw['gpu']}. That is the machine "
              "writing this report; quickstart.sh writes it right after the stages below.", ""]
        L += _table(["stage", "seconds"], [[n, f"{t:.1f}"] for n, t in times] + [["**total**", f"**{total_s:.1f}**"]])
        L += [""]
        basis = "the quickstart's total wall time"
    else:
        total_s = sum(r["train_time"] or 0.0 for r in all_runs)
        L += ["No quickstart_times.tsv or gpu_speedrun_times.tsv (written by quickstart.sh / gpu_speedrun.sh); the "
              "cost below uses training time only.", ""]
        basis = "the sum of training times"
    hours = total_s / 3600
    L += ["## Cost estimate", "",
          f"{hours:.3f} h ({basis}) x ${dollars_per_hour:.2f}/h (`--dollars-per-hour`) = "
          f"**${hours * dollars_per_hour:.2f}**.", ""]
    return "\n".join(L)


def write_report(out_dir: str | Path | None = None, dollars_per_hour: float = 0.10, plots: bool = True) -> Path:
    root = home()
    out = Path(out_dir) if out_dir else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    all_runs = runs()
    made = write_plots(all_runs, eval_rows(all_runs), out) if plots else {}
    path = out / "report.md"
    write_text_atomic(path, render(root, all_runs, dollars_per_hour, made))
    return path
