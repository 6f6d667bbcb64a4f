"""The ``mltl`` command: run, validate, plugins.

Exit status: 0 on success, 2 on a user error (one line on stderr, no traceback), 1 on an internal error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import UserError
from ..running.rundir import RunFiles
from ..version import __version__
from .console import make_console

EPILOG_RUN = """examples:
  mltl run examples/rare_liver.toml
  mltl run examples/rare_liver.toml --set stages.target.train.epochs=50 --out runs/liver-50
  mltl run examples/rare_liver.toml --resume --out runs/liver-50      # after a crash or Ctrl-C
  mltl run examples/rare_kidney.toml --device cuda --set 'stages.intermediate.freeze={ sweep = ["C1", "C1-C2"] }'
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mltl", description="Multi-stage transfer learning for rare medical image datasets.")
    p.add_argument("--version", action="version", version=f"mltl {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("run", help="run a chain from a TOML stage list", epilog=EPILOG_RUN,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("config", help="the stage-list TOML file")
    r.add_argument("--out", help="the run directory (new or empty); default runs/<run name>[-N]")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. stages.target.train.epochs=5 (repeatable)")
    r.add_argument("--device", help="auto (CUDA when present), cpu, cuda, cuda:N; overrides [run] device")
    r.add_argument("--resume", action="store_true",
                   help="continue an interrupted run (in --out, default the latest runs/<name>[-N]): finished "
                        "stages and variants are reused, an unfinished one continues from its checkpoint")
    r.add_argument("--reuse", action="append", default=[], metavar="RUN_DIR",
                   help="copy, instead of training, each stage that RUN_DIR finished from the same data, settings "
                        "and upstream stages (e.g. a new target on an earlier run's intermediate; repeatable)")

    c = sub.add_parser("compare", help="the same target from scratch, single-stage and multi-stage, side by side",
                       epilog="example:\n  mltl compare examples/rare_kidney.toml --set stages.target.train.epochs=50",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("config")
    c.add_argument("--out", help="folder for the three runs and comparison.md; default runs/<name>-compare[-N]")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("--device")
    c.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the CIs and p-values")
    c.add_argument("--resume", action="store_true",
                   help="continue an interrupted comparison in --out: each chain resumes its own run directory")
    c.add_argument("--reuse", metavar="DIR",
                   help="an earlier comparison folder (or run directory): stages it finished from the same data, "
                        "settings and upstream stages are copied, not trained again")

    pr = sub.add_parser("predict", help="classify new images with a trained stage",
                        epilog="examples:\n  mltl predict runs/rare-kidney/target scans/*.png\n"
                               "  mltl predict runs/rare-kidney new_cases/ --csv new_cases.csv",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    pr.add_argument("stage", help="RUN_DIR/STAGE, or RUN_DIR for its last stage")
    pr.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    pr.add_argument("--csv", help="write path, predicted class and class probabilities to this CSV file")
    pr.add_argument("--device", default="auto")
    pr.add_argument("--batch-size", type=int, default=256)

    v = sub.add_parser("validate", help="check a config and its data without training",
                       epilog="example:\n  mltl validate examples/rare_liver.toml --set stages.source.train.epochs=2",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("config")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    rk = sub.add_parser("rank", help="rank trained stages as starting points for a target, without training (LogME)",
                        epilog="examples:\n  mltl rank examples/rare_kidney.toml runs/rare-kidney\n"
                               "  mltl rank examples/rare_kidney.toml runs/a/source runs/b/intermediate --stage target\n"
                               "see docs/rank.md", formatter_class=argparse.RawDescriptionHelpFormatter)
    rk.add_argument("config", help="the config whose stage (default: the last) supplies the target's training split")
    rk.add_argument("candidates", nargs="+", help="model.safetensors files, stage directories or run directories")
    rk.add_argument("--stage", help="the target stage of CONFIG (default: its last stage)")
    rk.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    rk.add_argument("--features", default="classifier-input", choices=("classifier-input", "trunk"),
                    help="the classifier's input (default) or the trunk output")
    rk.add_argument("--device", default="cpu")
    rk.add_argument("--json", help="also write the ranking to this JSON file")

    sub.add_parser("plugins", help="list installed plugins, their distributions and what they provide",
                   epilog="example:\n  MLTL_LOAD_PLUGINS=mltl-gfe mltl plugins",
                   formatter_class=argparse.RawDescriptionHelpFormatter)

    data = sub.add_parser("data", help="audit data: class counts, bad files, duplicates and leakage")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    dc = data_sub.add_parser(
        "check", help="audit an image folder or every domain of a config (see docs/data-check.md)",
        epilog="Exit status: 0 nothing found that would corrupt an evaluation; 1 problems (corrupt files, a class\n"
               "with < 2 images, duplicates across splits or stages, one image under two classes); 2 a usage error.\n\n"
               "examples:\n  mltl data check ../shared/data/ct_kidney\n"
               "  mltl data check ../shared/data/ct_kidney --group-near-duplicates\n"
               "  mltl data check examples/kidney_ct.toml --json > audit.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    dc.add_argument("target", metavar="PATH_OR_CONFIG", help="a folder with one sub-folder per class, or a config .toml")
    dc.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config only: override a key, as for mltl run")
    dc.add_argument("--json", action="store_true", help="print the whole report as JSON instead of tables")
    dc.add_argument("--classes", help="folder only: comma-separated class sub-folders (default all)")
    dc.add_argument("--val", type=float, default=0.2, help="folder only: validation fraction of the split checked")
    dc.add_argument("--test", type=float, default=0.2, help="folder only: test fraction of the split checked")
    dc.add_argument("--seed", type=int, default=0, help="folder only: split seed")
    dc.add_argument("--group-near-duplicates", action="store_true",
                    help="folder only: split duplicate groups whole, as split.group_near_duplicates does")

    ex = sub.add_parser("export", help="write a trained stage as ONNX or TorchScript, with its preprocessing metadata",
                        epilog="The exported model takes uint8 images (N, channels, size, size) and returns class\n"
                               "probabilities; normalisation and softmax are inside it. The preprocessing that turns a\n"
                               "file into those pixels is in OUT.json (and in the model's metadata).\n\n"
                               "examples:\n  mltl export runs/rare-liver/target --format onnx\n"
                               "  mltl export runs/rare-liver --format torchscript --out deploy/liver.pt",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ex.add_argument("stage", help="RUN_DIR/STAGE, or RUN_DIR for its last stage")
    ex.add_argument("--format", choices=["onnx", "torchscript"], default="onnx", help="default: onnx")
    ex.add_argument("--out", help="the model file; default STAGE/model.onnx or STAGE/model.pt")
    ex.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"], default="auto",
                    help="ONNX only: torch's exporter (auto: the torch.export-based one, falling back to the "
                         "TorchScript-based one)")

    npl = sub.add_parser("new-plugin", help="create a plugin package (a domain, a test, pyproject.toml) to edit",
                         epilog="examples:\n  mltl new-plugin hospital-xray\n"
                                "  mltl new-plugin hospital-xray --dir ~/src && pip install ~/src/mltl-hospital-xray",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    npl.add_argument("name", help="the domain name: lowercase letters, digits and hyphens (package: mltl-NAME)")
    npl.add_argument("--dir", help="where to create the mltl-NAME folder; default the current folder")

    rep = sub.add_parser("report", help="regenerate the reports (figures, report.md, report.html) of a run directory",
                         epilog="Nothing is retrained: every number is recomputed from the stages' predictions.csv.\n"
                                "Stages without metrics.json (an interrupted run) are listed as unfinished.\n\n"
                                "examples:\n  mltl report runs/rare-liver\n"
                                "  mltl report runs/rare-liver --set evaluation.case_aggregate=max "
                                "--set gradcam.per_class=4",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    rep.add_argument("run_dir", help="the run directory (holds config.toml)")
    rep.add_argument("--set", dest="options", action="append", default=[], metavar="REPORTER.OPTION=VALUE",
                     help="a reporter option, e.g. evaluation.case_aggregate=max, roc.n_resamples=2000 (repeatable)")
    rep.add_argument("--reporters", help="comma-separated reporters to replay; default the run's [run] reporters "
                                         "(all installed when unset)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.quiet:
        os.environ["MLTL_QUIET"] = "1"
    if args.command is None:
        _parser().print_help()
        return 2
    try:
        commands = {"rank": _rank, "run": _run, "compare": _compare, "predict": _predict, "validate": _validate, "plugins": _plugins,
                    "export": _export, "new-plugin": _new_plugin, "report": _report, "data": _data}
        return commands[args.command](args)
    except UserError as exc:
        print(f"mltl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mltl: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        import errno

        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"mltl: error: disk full while writing {exc.filename or 'the run directory'}: free space and "
              f"continue with `mltl run CONFIG --resume --out RUN_DIR`", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is a RuntimeError
        if "out of memory" not in str(exc).lower():
            raise
        print("mltl: error: out of GPU memory: lower stages.<name>.train.batch_size (or [input] size), "
              "then continue with `mltl run CONFIG --resume --out RUN_DIR`", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from ..running.chain import run
    from ..training.train import Interrupted

    try:
        result = run(args.config, out=args.out, device=args.device, overrides=args.overrides, resume=args.resume,
                     reuse=args.reuse)
    except Interrupted as exc:
        from ..training.distributed import is_writer

        if is_writer():  # under torchrun: rank 0 only
            print(f"mltl: {exc}; continue with: mltl run {args.config} --resume"
                  + (f" --out {args.out}" if args.out else ""), file=sys.stderr)
        return 130
    from ..training.distributed import is_writer

    if is_writer():  # under torchrun: rank 0 only
        print(result.run_dir)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from ..running.compare import compare

    result = compare(args.config, overrides=args.overrides, out=args.out, device=args.device,
                     n_resamples=args.resamples, resume=args.resume, reuse=args.reuse)
    print((result.out / "comparison.md").read_text())
    print(result.out)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from rich.table import Table

    from ..deploy.predict import load_stage, predict, predictions_csv
    from ..running.preflight import resolve_device
    from ..running.rundir import write_text_atomic

    stage = load_stage(args.stage)
    rows = list(predict(stage, args.images, device=str(resolve_device(args.device)), batch_size=args.batch_size))
    if args.csv:
        write_text_atomic(Path(args.csv), predictions_csv(rows, stage.classes))
    table = Table(title=f"{stage.path}: {len(rows)} images")
    for col in ["image", "predicted"] + [f"p({c})" for c in stage.classes]:
        table.add_column(col)
    for path, p in rows[:50]:
        table.add_row(str(path), stage.classes[int(p.argmax())], *(f"{v:.3f}" for v in p))
    make_console().print(table)
    if len(rows) > 50:
        print(f"... {len(rows) - 50} more" + (f" in {args.csv}" if args.csv else "; use --csv to keep them all"))
    return 0


def _data(args: argparse.Namespace) -> int:
    import json

    from ..data.datacheck import check_config, check_folder, render

    target = Path(args.target)
    if target.is_dir():
        for name, value in (("--val", args.val), ("--test", args.test)):
            if not 0 < value < 1:
                raise UserError(f"data check: {name} must be a fraction between 0 and 1, got {value}")
        report = check_folder(target, classes=args.classes.split(",") if args.classes else None, val=args.val,
                              test=args.test, seed=args.seed, group_near_duplicates=args.group_near_duplicates)
    elif target.is_file():
        from ..config import load_config
        from ..plugins import get_registry
        from ..running.preflight import validate

        config = load_config(target, args.overrides)
        validate(config)
        report = check_config(config, get_registry(), args.overrides)
    else:
        raise UserError(f'data check: "{args.target}" is neither a folder of class sub-folders nor a config file')
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        render(report, make_console())
    return 0 if report["ok"] else 1


def _validate(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..running.preflight import prepare

    config = load_config(args.config, args.overrides)
    chain = prepare(config)  # what `mltl run` checks before training: reads every image, leakage, every split
    n = sum(len(s.variants) for s in config.stages)
    images = sum(len(d) for d in chain.domains.values())
    print(f"{args.config}: OK ({len(config.stages)} stages, {n} variants to train, {images} images readable)")
    return 0


def _rank(args: argparse.Namespace) -> int:
    from rich.table import Table

    from ..config import load_config
    from ..evaluation.rank import rank, ranking_json
    from ..running.preflight import resolve_device
    from ..running.rundir import write_text_atomic

    config = load_config(args.config, args.overrides)
    rows, info = rank(config, args.candidates, stage=args.stage, device=str(resolve_device(args.device)),
                      features=args.features)
    table = Table(title=f"LogME on {info['stage']} ({info['domain']}): {info['images']} training images, "
                        f"{len(info['classes'])} classes, features = {info['features']}; higher is better")
    for col in ("rank", "candidate", "backbone", "features", "LogME"):
        table.add_column(col)
    for i, r in enumerate(rows, start=1):
        table.add_row(str(i), r.name, r.backbone, str(r.feature_dim), f"{r.score:.4f}")
    make_console(min_width=120).print(table)
    if info["protocol"] != "holdout":
        print(f"note: stage {info['stage']} is evaluated with protocol {info['protocol']}: its test folds include "
              f"these training images, so this choice reads test labels; see docs/rank.md")
    if args.json:
        write_text_atomic(Path(args.json), ranking_json(rows, info))
    return 0


def _plugins(args: argparse.Namespace) -> int:
    from rich.table import Table

    from ..plugins import get_registry, plugin_infos

    registry = get_registry()
    provides: dict[str, list[str]] = {}
    for kind in ("domain", "backbone", "freeze policy", "reporter"):
        for item in registry.all(kind):
            provides.setdefault(item.plugin, []).append(f"{kind} {item.name}")
    table = Table(title="mltl plugins")
    for col in ("plugin", "distribution", "version", "provides", "hooks"):
        table.add_column(col)
    for info in plugin_infos():
        table.add_row(info.name, info.distribution or "-", info.version or "-",
                      "\n".join(provides.get(info.name, [])) or "-", "\n".join(info.hooks))
    make_console(min_width=120).print(table)
    return 0


def _export(args: argparse.Namespace) -> int:
    from ..deploy.export import export

    result = export(args.stage, args.format, args.out, exporter=args.exporter)
    meta = result.metadata
    print(f"{result.path} ({result.format}, {result.exporter}): uint8 images (N, {meta['input']['channels']}, "
          f"{meta['input']['size']}, {meta['input']['size']}) -> probabilities of {', '.join(meta['classes'])}")
    print(f"{result.sidecar}: preprocessing metadata")
    return 0


def _new_plugin(args: argparse.Namespace) -> int:
    from .scaffold import scaffold

    root = scaffold(args.name, args.dir)
    print(f"{root}: plugin package created; next:\n  pip install {root}\n  mltl plugins\n"
          f"  pytest {root / 'tests'}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from ..evaluation.report import parse_reporter_options, regenerate

    names = None if args.reporters is None else [n.strip() for n in args.reporters.split(",") if n.strip()]
    done = regenerate(args.run_dir, reporter_options=parse_reporter_options(args.options), reporters=names)
    print(f"{done.run_dir}: reported {len(done.finished)} finished stage(s)"
          + (f"; unfinished: {', '.join(done.unfinished)}" if done.unfinished else "")
          + f" (reporters: {', '.join(done.reporters) or 'none'})")
    print(RunFiles(done.run_dir).report_html)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
