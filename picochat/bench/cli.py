"""`picochat bench ...`: each benchmark module adds its own subcommand (add_parser(bench_subparsers))."""
import importlib

BENCH_MODULES = (
    "picochat.bench.attention",  # picochat bench attention [--train]
    "picochat.bench.train",      # picochat bench train
)


def register(sub) -> None:
    bench = sub.add_parser("bench", help="measure attention variants and training speed on this machine")
    group = bench.add_subparsers(dest="bench", required=True)
    for name in BENCH_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:  # a benchmark still being written
            if e.name is None or not name.startswith(e.name):  # the module (or its package) itself
                raise
            continue
        module.add_parser(group)
