"""Fingerprint a finished run directory, to show that a refactoring changed no result.

Every ``predictions.csv``, ``oof_predictions.csv`` and ``splits.csv`` in the run (stages, repeats and
sweep variants) is hashed byte for byte, and every ``metrics.json`` is kept as its values less wall-clock
times (keys that name seconds). Two fingerprints of the same config, seed, machine and torch build
must be equal::

    mltl run examples/rare_liver.toml --out /tmp/before        # on the old commit
    python tools/demo_fingerprint.py /tmp/before --save /tmp/before.json
    mltl run examples/rare_liver.toml --out /tmp/after         # on the new commit
    python tools/demo_fingerprint.py /tmp/after --check /tmp/before.json

``--check`` prints every file that differs and exits 1 if any does. Results are only comparable on one
machine with one torch build (float kernels differ between CPUs and versions).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

HASHED = ("predictions.csv", "oof_predictions.csv", "splits.csv")


def _without_times(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def fingerprint(run_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir).as_posix()
        if path.name in HASHED:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.name == "metrics.json":
            out[rel] = _without_times(json.loads(path.read_text()))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="a finished run directory")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", type=Path, metavar="FILE", help="write the fingerprint to FILE")
    group.add_argument("--check", type=Path, metavar="FILE", help="compare with a fingerprint saved earlier")
    args = ap.parse_args(argv)
    if not (args.run_dir / "config.toml").is_file():
        print(f"{args.run_dir}: not an mltl run directory (no config.toml)", file=sys.stderr)
        return 2
    now = fingerprint(args.run_dir)
    if args.save:
        args.save.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
        print(f"{len(now)} files fingerprinted into {args.save}")
        return 0
    before = json.loads(args.check.read_text())
    differ = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    for k in differ:
        what = "missing now" if k not in now else "new" if k not in before else "differs"
        print(f"{k}: {what}")
    print(f"{len(now)} files, {len(differ)} differ from {args.check}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
