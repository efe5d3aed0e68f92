"""`picochat report`: the report card renders from a fixture home (tiny checkpoints, an eval, wall times)."""
import json
import os

import pytest

from evalkit import make_home

HISTORY = [{"step": 1, "loss": 5.5}, {"step": 2, "loss": 5.0}, {"step": 2, "val_bpb": 3.2},
           {"step": 3, "loss": 4.25}, {"step": 3, "val_bpb": 3.1}]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    h = tmp_path_factory.mktemp("home")
    make_home(h, tags=("base/t", "mid/t", "sft/t"), history=HISTORY)
    (h / "data" / "embedded").mkdir(parents=True)
    (h / "data" / "embedded" / "meta.json").write_text(json.dumps(
        {"source": "embedded", "train_docs": 1028, "train_chars": 4780000, "val_docs": 61, "val_chars": 270000}))
    (h / "quickstart_times.tsv").write_text("data\t2.0\nbase\t300.5\neval\t57.5\n")
    from picochat.cli import main
    assert main(["eval", "chat", "--model", "sft/t", "--tasks", "spelling", "--limit", "2", "--max-tokens", "2",
                 "--device", "cpu"]) == 0
    return h


def test_report_card_renders_everything(home, capsys):
    from picochat.cli import main
    assert main(["report", "--dollars-per-hour", "10"]) == 0
    out = home / "report"
    assert f"report card -> {out / 'report.md'}" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    for section in ("## Hardware", "## Data", "## Tokenizer", "## Training", "## Evaluations", "## Wall times",
                    "## Cost estimate"):
        assert section in md
    assert f"({os.cpu_count()} cores)" in md and "Vocabulary 300 tokens" in md
    import torch
    from picochat.eval.report import ISA_NAMES
    isa = ISA_NAMES.get(torch.backends.cpu.get_cpu_capability(), torch.backends.cpu.get_cpu_capability())
    assert f"| CPU instruction set (torch's kernels) | {isa}" in md
    times = md.split("## Wall times")[1]
    assert f"cores, {isa}" in times.split("| stage |")[0]  # the instruction set is named next to the stage times
    assert "| embedded | embedded | 1,028 | 4,780,000 | 61 | 270,000 |" in md
    training = md.split("## Training")[1].split("## Evaluations")[0]
    rows = {line.split(" | ")[0][2:]: line for line in training.splitlines() if line.startswith("| `")}
    assert "| base | – |" in rows["`base/t`"] and rows["`base/t`"].endswith("| 4.250 | 3.0000 |")
    assert "| mid | base/t |" in rows["`mid/t`"] and rows["`mid/t`"].endswith("| 2.0000 |")
    assert rows["`sft/t`"].endswith("| 1.0000 |") and "| 384 |" in rows["`sft/t`"]  # tokens
    ev = json.loads(next((home / "checkpoints" / "sft" / "t").glob("eval_chat_*.json")).read_text())
    spelling = ev["results"]["spelling"]
    assert f"| `sft/t` | chat | spelling | pass@1 | {100 * spelling['accuracy']:.1f}% | 2 | – |" in md
    assert "| **total** | **360.0** |" in md
    assert "0.100 h (the quickstart's total wall time) x $10.00/h (`--dollars-per-hour`) = **$1.00**" in md
    for name in ("loss", "val_bpb", "evals"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name}.png)" in md
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # atomic writes leave no temp files


def test_report_without_plots_or_times_uses_training_time(home, tmp_path):
    from picochat.eval.report import write_report
    (home / "quickstart_times.tsv").rename(home / "times.bak")
    try:
        path = write_report(out_dir=tmp_path / "r", dollars_per_hour=3600, plots=False)
    finally:
        (home / "times.bak").rename(home / "quickstart_times.tsv")
    md = path.read_text()
    assert not list((tmp_path / "r").glob("*.png")) and ".png)" not in md
    # three checkpoints x 1.5 s of training = 4.5 s = 0.00125 h, at $3600/h = $4.50
    assert "the sum of training times" in md and "**$4.50**" in md


def test_wall_times_come_from_the_newest_pipeline_run(tmp_path):
    import os
    from picochat.eval.report import wall_times
    (tmp_path / "quickstart_times.tsv").write_text("data\t4.3\nbase\t656.0\n")
    assert wall_times(tmp_path) == [("data", 4.3), ("base", 656.0)]
    gpu = tmp_path / "gpu_speedrun_times.tsv"
    gpu.write_text("[1] data prepare\t3600.0\n[3] train base\t12000.5\n")
    os.utime(gpu, (2e9, 2e9))  # newer than the quickstart's
    assert wall_times(tmp_path) == [("[1] data prepare", 3600.0), ("[3] train base", 12000.5)]


def test_cpu_isa_names_what_torch_uses_and_what_the_cpu_has():
    from picochat.eval.report import cpu_isa
    zen4 = {"avx", "avx2", "avx512f", "avx512bw"}
    assert cpu_isa("AVX512", zen4) == "AVX-512, AMX: no"
    assert cpu_isa("AVX512", zen4 | {"amx_tile", "amx_bf16"}) == "AVX-512, AMX: yes"
    # ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU: the timings are AVX2's, and the report says both
    assert cpu_isa("AVX2", zen4, "avx2") == "AVX2 (ATEN_CPU_CAPABILITY=avx2; the CPU has AVX-512), AMX: no"
    assert cpu_isa("AVX2", {"avx", "avx2"}, "avx2") == "AVX2, AMX: no"  # forcing what it has anyway changes nothing
    assert cpu_isa("NEON", set()) == "NEON"  # no x86 flags (ARM, macOS): no AMX either way


def test_every_eval_bar_names_its_metric(monkeypatch, tmp_path):
    from picochat.eval import report
    figs = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figs.append(fig) or True)
    row = {"model": "sft/d4", "kind": "chat", "task": "arithmetic", "n": 100, "chance": None}
    rows = [{**row, "metric": "pass@1", "value": 0.99}, {**row, "metric": "answer == calculator result", "value": 0.97},
            {**row, "metric": "bpb", "value": 1.9}]
    assert report.plot_evals(rows, tmp_path / "evals.png")
    labels = [t.get_text() for t in figs[0].axes[0].get_yticklabels()]
    assert labels == ["arithmetic pass@1 · sft/d4", "arithmetic answer == calculator result · sft/d4"]
