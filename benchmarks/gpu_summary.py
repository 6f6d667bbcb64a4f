#!/usr/bin/env python
"""Gather the output of ``benchmarks/gpu.sh`` into ``summary.json`` and a short ``summary.md`` table.

    python benchmarks/gpu_summary.py OUT_DIR

Reads ``meta.json``, ``throughput.jsonl``, ``chain.jsonl``, ``loop_ab_before.jsonl``, ``loop_ab_stream.jsonl``,
``compile.jsonl``, ``ddp.jsonl``, ``pytest.txt`` and ``steps.tsv`` from OUT_DIR (whatever exists) and writes
the numbers issue 18 asks for: per backbone and loop images/s, training FLOPs per image, achieved TFLOP/s,
fraction of the dense BF16 peak and peak GPU memory; mltl / bare and mltl / ImageFolder for GFE-II at
150 px; the paper-scale chain projected in hours; the loop A/B ratios; the seconds of every step. A number
that a CPU run cannot give is null, with the reason beside it. On a CPU dry run the issue's targets are not
judged (``meets_targets`` null): they are GPU targets.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

TARGETS = {"vs_bare": 0.95, "vs_imagefolder": 5.0, "projected_total_hours_below": 0.5}
PRIMARY = "gfe-2@150"
LOOP_NAMES = {"bare": "bare PyTorch", "mltl": "mltl fit", "imagefolder": "ImageFolder+DataLoader"}


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for ln in path.read_text().splitlines():
        if ln.startswith("{"):
            try:
                out.append(json.loads(ln))
            except json.JSONDecodeError:
                pass
    return out


def _last(rows: list[dict[str, Any]], kind: str = "summary") -> dict[str, Any] | None:
    rows = [r for r in rows if r.get("kind") == kind]
    return rows[-1] if rows else None


def _fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return str(v)


def summarise(out: Path) -> dict[str, Any]:
    meta = json.loads((out / "meta.json").read_text()) if (out / "meta.json").exists() else {}
    dry = meta.get("mode") == "cpu dry run"
    tp_rows = _lines(out / "throughput.jsonl")
    tp = _last(tp_rows)
    chain_rows = _lines(out / "chain.jsonl")
    chain = _last(chain_rows)
    env = tp or chain or {}
    s: dict[str, Any] = {
        "mode": meta.get("mode", "unknown"),
        "date_utc": meta.get("date_utc"),
        "commit": meta.get("commit"), "commit_text": meta.get("commit_text"), "describe": meta.get("describe"),
        "changed_paths_at_commit": meta.get("changed_paths"),
        "device": env.get("device"), "device_name": env.get("device_name"), "torch": env.get("torch"),
        "cuda": env.get("cuda"), "python": env.get("python"), "cpus": env.get("cpus"),
        "targets": TARGETS,
    }
    if dry:
        s["warning"] = ("CPU dry run: these numbers rehearse the script on a CPU at small sizes; they are not GPU "
                        "numbers and say nothing about the issue's GPU targets")

    # ---- throughput: per backbone and loop
    s["throughput"] = None
    if tp:
        meas = {(r["backbone"], r["size"], r["loop"]): r for r in tp_rows if r.get("kind") == "measurement"}
        per: dict[str, Any] = {}
        for key, row in tp["per_backbone"].items():
            name, size = key.split("@")
            loops = {}
            for lp, ips in row["images_per_s"].items():
                m = meas.get((name, int(size), lp), {})
                loops[lp] = {
                    "images_per_s": ips,
                    "train_flops_per_image": (row.get("train_flops_per_image") or {}).get(lp),
                    "gflops_per_image": (row.get("gflops_per_image") or {}).get(lp),
                    "achieved_tflops": (row.get("achieved_tflops") or {}).get(lp),
                    "fraction_of_bf16_peak": (row.get("fraction_of_bf16_peak") or {}).get(lp),
                    "peak_gpu_mem_mb": m.get("peak_gpu_mem_mb"),
                    "peak_gpu_mem_reserved_mb": m.get("peak_gpu_mem_reserved_mb"),
                    "peak_rss_mb": m.get("peak_rss_mb"),
                    "median_epoch_seconds": row["median_epoch_seconds"].get(lp),
                }
                if lp == "mltl":
                    loops[lp]["images_per_s_train_only"] = row.get("mltl_images_per_s_train_only")
                    loops[lp]["achieved_tflops_train_only"] = row.get("mltl_achieved_tflops_train_only")
                    loops[lp]["fraction_of_bf16_peak_train_only"] = row.get("mltl_fraction_of_bf16_peak_train_only")
                    loops[lp]["val_share"] = row.get("mltl_val_share")
            per[key] = {"loops": loops, "n_train": row.get("n_train"),
                        "vs_bare": row.get("vs_bare"), "vs_imagefolder": row.get("vs_imagefolder"),
                        "vs_bare_train_only": row.get("vs_bare_train_only"),
                        "bare_vs_imagefolder": row.get("bare_vs_imagefolder")}
        any_row = next(iter(tp["per_backbone"].values()))
        s["peak_bf16_dense_tflops"] = any_row.get("peak_bf16_dense_tflops")
        s["peak_source"] = any_row.get("peak_source")
        s["peak_note"] = any_row.get("peak_note")
        s["peak_gpu_mem_note"] = any_row.get("peak_gpu_mem_note")
        s["flops_note"] = any_row.get("flops_note")
        s["throughput"] = per
        s["throughput_data"] = tp.get("data_source")

    # ---- the ratios
    ratios: dict[str, Any] = {}
    if s["throughput"]:
        key = PRIMARY if PRIMARY in s["throughput"] else tp.get("primary")
        ratios["backbone"] = key
        if key != PRIMARY:
            ratios["backbone_note"] = f"{PRIMARY} was not measured in this run (dry run size); ratios of {key}"
        ratios["mltl_over_bare"] = s["throughput"][key]["vs_bare"]
        ratios["mltl_over_imagefolder"] = s["throughput"][key]["vs_imagefolder"]
        ratios["mltl_train_only_over_bare"] = s["throughput"][key]["vs_bare_train_only"]
    if chain and "projected_total_hours" in chain:
        ratios["paper_chain_projected_hours"] = chain["projected_total_hours"]
        ratios["paper_chain_projected_hours_per_stage"] = chain.get("projected_hours")
        ratios["paper_chain_projected_hours_without_validation"] = chain.get("projected_total_hours_without_validation")
        ratios["projection_note"] = chain.get("projection_note")
    if dry:
        s["meets_targets"] = None
        s["meets_targets_note"] = "not judged on a CPU dry run (the targets are for one GPU)"
    else:
        def ge(v, t):
            return None if v is None else v >= t
        s["meets_targets"] = {
            "vs_bare": ge(ratios.get("mltl_over_bare"), TARGETS["vs_bare"]),
            "vs_imagefolder": ge(ratios.get("mltl_over_imagefolder"), TARGETS["vs_imagefolder"]),
            "paper_chain_hours": (None if ratios.get("paper_chain_projected_hours") is None
                                  else ratios["paper_chain_projected_hours"] < TARGETS["projected_total_hours_below"]),
        }
    s["ratios"] = ratios

    # ---- chain details
    if chain:
        proj = [r for r in chain_rows if r.get("kind") == "projection_measurement"]
        demo = _last(chain_rows, "demo")
        s["chain"] = {"demo_total_seconds": chain.get("demo_total_seconds"),
                      "demo_stage_seconds": chain.get("demo_stage_seconds"),
                      "demo_peak_gpu_mem_mb": (demo or {}).get("peak_gpu_mem_mb"),
                      "projection": [{k: r.get(k) for k in ("stage", "variant", "measured_n_train",
                                                            "median_epoch_seconds", "train_images_per_s",
                                                            "projected_epoch_seconds", "projected_hours",
                                                            "peak_gpu_mem_mb")} for r in proj]}

    # ---- loop A/B, compile, ddp, tests, steps
    for name in ("loop_ab_before", "loop_ab_stream"):
        ab = _last(_lines(out / f"{name}.jsonl"))
        s[name] = None if ab is None else {k: ab.get(k) for k in (
            "a", "b", "a_median", "b_median", "b_over_a", "a_images_per_s", "b_images_per_s", "n_train", "size",
            "channels", "a_peak_gpu_mem_mb", "b_peak_gpu_mem_mb", "peak_gpu_mem_note", "note")}
    comp = _last(_lines(out / "compile.jsonl"))
    if comp:
        key = comp.get("primary")
        row = comp["per_backbone"].get(key, {})
        s["compile"] = {"backbone": key, "images_per_s": row.get("images_per_s"), "vs_bare": row.get("vs_bare"),
                        "note": "mltl with train.compile = true against the eager bare loop"}
    else:
        s["compile"] = None
    ddp = _last(_lines(out / "ddp.jsonl"))
    s["ddp"] = None if ddp is None else {k: ddp.get(k) for k in ("processes", "speedup", "images_per_s")}
    pt = out / "pytest.txt"
    if pt.exists():
        text = pt.read_text()
        res = re.findall(r"^=*\s*(\d+ (?:passed|failed|error).*?) in [\d.]+s", text, re.M)
        rc = re.findall(r"pytest exit status: (\d+)", text)
        s["pytest"] = {"result": res[-1] if res else text.strip().splitlines()[-1:],
                       "exit_status": int(rc[-1]) if rc else None}
    else:
        s["pytest"] = None
    steps = out / "steps.tsv"
    if steps.exists():
        rows = [ln.split("\t") for ln in steps.read_text().splitlines()[1:] if ln.strip()]
        s["steps"] = [{"step": r[0], "seconds": int(r[1]), "exit_status": r[2] if len(r) > 2 else None}
                      for r in rows]
        s["steps_total_seconds"] = sum(int(r[1]) for r in rows)
    return s


def markdown(s: dict[str, Any]) -> str:
    dry = s["mode"] == "cpu dry run"
    head = (f"**{'CPU DRY RUN, not GPU numbers' if dry else 'GPU'}**: {s.get('device_name')} "
            f"({s.get('device')}), torch {s.get('torch')} (CUDA {s.get('cuda')}), Python {s.get('python')}, "
            f"commit `{(s.get('commit') or 'unknown')[:12]}` ({s.get('describe') or 'no git description'}), "
            f"{s.get('date_utc')}.")
    lines = [head, ""]
    peak = s.get("peak_bf16_dense_tflops")
    lines.append(f"Dense BF16 peak used: {_fmt(peak, 0) + ' TFLOP/s' if peak else 'none'} "
                 f"({s.get('peak_source') or s.get('peak_note')}).")
    lines.append("")
    lines.append("| backbone | loop | images/s | GFLOP/image (train) | achieved TFLOP/s | of BF16 peak | "
                 "peak GPU memory (MB) |")
    lines.append("|---|---|---|---|---|---|---|")
    for key, row in (s.get("throughput") or {}).items():
        for lp, v in row["loops"].items():
            frac = v.get("fraction_of_bf16_peak")
            lines.append(f"| {key.replace('@', ' ')} px | {LOOP_NAMES.get(lp, lp)} | {_fmt(v['images_per_s'])} | "
                         f"{_fmt(v.get('gflops_per_image'), 2)} | {_fmt(v.get('achieved_tflops'), 2)} | "
                         f"{'n/a' if frac is None else f'{100 * frac:.2f}%'} | {_fmt(v.get('peak_gpu_mem_mb'), 0)} |")
    r = s.get("ratios", {})
    lines.append("")
    t = s["targets"]
    lines.append(f"- {r.get('backbone')}: mltl / bare **{_fmt(r.get('mltl_over_bare'), 3)}** (target >= {t['vs_bare']}), "
                 f"mltl / ImageFolder **{_fmt(r.get('mltl_over_imagefolder'), 2)}** (target >= {t['vs_imagefolder']}), "
                 f"mltl without validation / bare {_fmt(r.get('mltl_train_only_over_bare'), 3)}.")
    lines.append(f"- Paper-scale chain projected: **{_fmt(r.get('paper_chain_projected_hours'), 3)} h** "
                 f"(target < {t['projected_total_hours_below']} h; per stage "
                 f"{r.get('paper_chain_projected_hours_per_stage')}).")
    for name, label in (("loop_ab_before", "loop A/B (before -> working tree)"),
                        ("loop_ab_stream", "resident -> streamed")):
        ab = s.get(name)
        if ab:
            lines.append(f"- {label}: B/A epoch time **{ab['b_over_a']}** ({ab['a']}: {ab['a_median']} s; "
                         f"{ab['b']}: {ab['b_median']} s).")
    if s.get("compile"):
        lines.append(f"- torch.compile (mltl) / eager bare: {s['compile'].get('vs_bare')}.")
    if s.get("pytest"):
        lines.append(f"- pytest: {s['pytest']['result']} (exit status {s['pytest']['exit_status']}).")
    if s.get("steps"):
        lines.append("- Steps (s): " + ", ".join(f"{x['step']} {x['seconds']}" for x in s["steps"])
                     + f"; total {s.get('steps_total_seconds')} s.")
    if dry:
        lines.append("")
        lines.append(f"_{s.get('warning')}._ Null GPU fields: {s.get('peak_note')}; {s.get('peak_gpu_mem_note')}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: gpu_summary.py OUT_DIR")
    out = Path(argv[0])
    s = summarise(out)
    (out / "summary.json").write_text(json.dumps(s, indent=1) + "\n")
    md = markdown(s)
    (out / "summary.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
