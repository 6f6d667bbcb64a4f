"""The table of docs/demo.md: the demo's comparison (examples/rare_liver.toml) and its negative control
(examples/demo_negative_control.toml) over several seeds, every chain's pooled out-of-fold AUC on the same 120
target images, and paired differences (bootstrap over the images, 1,000 resamples) against scratch and
between the two multi-stage chains.

Usage, after one ``mltl compare`` of each config per seed (docs/demo.md gives the commands):
    python examples/studies/demo_summary.py runs/demo-compare-s7:runs/demo-control-s7 runs/demo-compare-s8:...
"""

from __future__ import annotations

import sys
from pathlib import Path

from mltl.evaluation.difference import paired_difference
from mltl.running.rundir import StageFiles, read_stage


def target(chain_dir: Path):
    result, _ = read_stage(StageFiles(chain_dir / "target"), "target")
    return result


def diff(a, b, sums: list) -> str:
    d = paired_difference(a, b)
    lo, hi = d["diff_ci95"]
    sums.append(d["diff"])
    return f"{d['diff']:+.3f} ({lo:+.3f} to {hi:+.3f})"


def auc(stage, sums: list) -> str:
    proto = stage.metrics.get("protocol") or {}
    value = proto["pooled"]["auc_macro"] if "pooled" in proto else stage.metrics["auc_macro"]
    sums.append(value)
    return f"{value:.3f}"


def main(pairs: list[str]) -> None:
    print("| seed | scratch | single-stage | multi-stage | control multi-stage | multi - scratch (95% CI) | "
          "control - scratch (95% CI) | multi - control (95% CI) |")
    print("|---|---|---|---|---|---|---|---|")
    columns: list[list[float]] = [[] for _ in range(7)]
    for pair in pairs:
        main_dir, control_dir = (Path(p) for p in pair.split(":"))
        scratch, single = target(main_dir / "scratch"), target(main_dir / "single-stage")
        multi, control = target(main_dir / "multi-stage"), target(control_dir / "multi-stage")
        seed = main_dir.name.rsplit("-s", 1)[-1]
        cells = [auc(scratch, columns[0]), auc(single, columns[1]), auc(multi, columns[2]), auc(control, columns[3]),
                 diff(multi, scratch, columns[4]), diff(control, scratch, columns[5]), diff(multi, control, columns[6])]
        print(f"| {seed} | " + " | ".join(cells) + " |")
    means = [f"{sum(c) / len(c):.3f}" for c in columns[:4]] + [f"{sum(c) / len(c):+.3f}" for c in columns[4:]]
    print(f"| mean of {len(pairs)} | " + " | ".join(means) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
