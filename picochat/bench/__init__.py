"""`picochat bench attention|train`: the command side only; the benchmarks live in benchmarks/ (its README)."""
