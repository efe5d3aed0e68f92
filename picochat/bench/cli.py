"""`picochat bench ...`: each benchmark script in the repository's benchmarks/ folder named here adds its
own subcommand (add_parser(bench_subparsers)). benchmarks/ is the one home of every benchmark
(benchmarks/README.md says why); a wheel install has no benchmarks/, and `picochat bench` says so."""
import argparse
import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
BENCH_SCRIPTS = (
    "attention",  # picochat bench attention [--train]
    "infer",      # picochat bench infer --depth 20 --quant none,int8,int4
    "train",      # picochat bench train
)


def load(name: str):
    """benchmarks/<name>.py as module bench_<name>, registered in sys.modules (dataclasses and pickle look there)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _no_benchmarks(args) -> None:
    from picochat.common import PicochatError
    raise PicochatError(f"picochat bench runs the scripts in the repository's benchmarks/ folder, not found at "
                        f"{BENCHMARKS}: clone the repository and `pip install -e .` there")


def register(sub) -> None:
    bench = sub.add_parser("bench", help="measure attention variants, inference and training speed on this machine")
    if not BENCHMARKS.is_dir():  # take any arguments, so that the error is this one, not argparse's
        bench.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        bench.set_defaults(func=_no_benchmarks)
        return
    group = bench.add_subparsers(dest="bench", required=True)
    for name in BENCH_SCRIPTS:
        load(name).add_parser(group)
