"""Run benchmarks: ``python -m benchmarks [NAME ...]`` (names = module names, e.g. ``split``; none: all of them),
or one with its options: ``python -m benchmarks NAME --option ...`` (``python -m benchmarks NAME --help``)."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time

import benchmarks


def main(argv: list[str]) -> int:
    names = argv or sorted(i.name for i in pkgutil.iter_modules(benchmarks.__path__) if not i.name.startswith("_"))
    options: list[str] = []
    if len(argv) > 1 and argv[1].startswith("-"):  # one benchmark with its own options
        names, options = argv[:1], argv[1:]
    failed = []
    for name in names:
        print(f"\n=== benchmarks.{name} ===", flush=True)
        start = time.perf_counter()
        module = importlib.import_module(f"benchmarks.{name}")
        try:
            if module.main(options) not in (0, None):
                failed.append(name)
        except SystemExit as exc:  # a benchmark may sys.exit(code)
            if exc.code not in (0, None):
                failed.append(name)
        except Exception as exc:  # noqa: BLE001 - report and continue with the next benchmark
            print(f"benchmark {name} failed: {exc}", flush=True)
            failed.append(name)
        print(f"=== {name}: {time.perf_counter() - start:.1f} s ===", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
