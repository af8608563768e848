"""``python -m launch.bench``: the index benchmark (same as ``python -m launch.bench.index_bench``)."""

from launch.bench.index_bench import main

if __name__ == "__main__":
    raise SystemExit(main())
