"""The ``mltl`` command line: every subcommand (run, validate, compare, predict, export, report, data check,
rank, plugins, new-plugin, config show, completion) parses its arguments here and calls the library.

Exit status (docs/cli.md): 0 on success, 1 on an internal error (a bug), 2 on a user error (one line on
stderr, no traceback), 3 when ``mltl data check`` finds problems, 130 on Ctrl-C.

Conventions: every argument has help text; ``--set KEY=VALUE`` always overrides a config key (``mltl report``
takes reporter options as ``--option REPORTER.KEY=VALUE``); ``--device`` is ``auto`` (CUDA when present)
unless the config's ``[run] device`` says otherwise.

:func:`main` is the one guard between the commands and the user: a :class:`~mltl.errors.UserError` (a
``ConfigError`` included), an operating-system error the user's environment causes (permission denied, disk
full, a file that vanished or a path that is too long), running out of memory and Ctrl-C each become one line
(exit 2, or 130 for Ctrl-C); anything else is a bug in mltl or a plugin and exits 1 with its traceback and a
request to report it.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from ..errors import UserError, did_you_mean
from ..running.rundir import RunFiles
from ..version import __version__
from .console import make_console

EXIT_OK = 0
EXIT_INTERNAL_ERROR = 1  # a bug in mltl or a plugin
EXIT_USER_ERROR = 2  # also argparse's own usage errors
EXIT_FINDINGS = 3  # `mltl data check` found problems in the data
EXIT_INTERRUPTED = 130  # Ctrl-C

SET_HELP = "override a config key, e.g. stages.target.train.epochs=5 (repeatable)"
DEVICE_HELP = ("auto (CUDA when present), cpu, cuda, cuda:N or mps; default: the config's [run] device, "
               "which is auto unless the config sets it")

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
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    r.add_argument("--device", help=DEVICE_HELP)
    r.add_argument("--resume", action="store_true",
                   help="continue an interrupted run (in --out, default the latest runs/<name>[-N]): finished "
                        "stages and variants are reused, an unfinished one continues from its checkpoint")
    r.add_argument("--reuse", action="append", default=[], metavar="RUN_DIR",
                   help="copy, instead of training, each stage that RUN_DIR finished from the same data, settings "
                        "and upstream stages (e.g. a new target on an earlier run's intermediate; repeatable)")

    c = sub.add_parser("compare", help="the same target from scratch, single-stage and multi-stage, side by side",
                       epilog="example:\n  mltl compare examples/rare_kidney.toml --set stages.target.train.epochs=50",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("config", help="the stage-list TOML file whose last stage is the target")
    c.add_argument("--out", help="folder for the three runs and comparison.md; default runs/<name>-compare[-N]")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    c.add_argument("--device", help=DEVICE_HELP)
    c.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples for the CIs and p-values (default: 1000)")
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
    pr.add_argument("--device", default="auto",
                    help="auto (CUDA when present), cpu, cuda, cuda:N or mps; default: auto")
    pr.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default: 256)")

    v = sub.add_parser("validate", help="check a config and its data without training",
                       epilog="example:\n  mltl validate examples/rare_liver.toml --set stages.source.train.epochs=2",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("config", help="the stage-list TOML file")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)

    rk = sub.add_parser("rank", help="rank trained stages as starting points for a target, without training (LogME)",
                        epilog="examples:\n  mltl rank examples/rare_kidney.toml runs/rare-kidney\n"
                               "  mltl rank examples/rare_kidney.toml runs/a/source runs/b/intermediate --stage target\n"
                               "see docs/rank.md", formatter_class=argparse.RawDescriptionHelpFormatter)
    rk.add_argument("config", help="the config whose stage (default: the last) supplies the target's training split")
    rk.add_argument("candidates", nargs="+", help="model.safetensors files, stage directories or run directories")
    rk.add_argument("--stage", help="the target stage of CONFIG (default: its last stage)")
    rk.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    rk.add_argument("--features", default="classifier-input", choices=("classifier-input", "trunk"),
                    help="the classifier's input (default) or the trunk output")
    rk.add_argument("--device", help=DEVICE_HELP)
    rk.add_argument("--json", help="also write the ranking to this JSON file")

    pl = sub.add_parser("plugins", help="list installed plugins, their distributions and what they provide; "
                        "with NAME, the options of that domain, backbone, freeze policy or reporter",
                        epilog="examples:\n  mltl plugins\n  mltl plugins medmnist      # its options, types and "
                        "defaults\n  MLTL_LOAD_PLUGINS=mltl-gfe mltl plugins",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    pl.add_argument("name", nargs="?", help="a registered domain, backbone, freeze policy or reporter name "
                    "(as in a config's plugin = / name =); prints its description and options")

    data = sub.add_parser("data", help="audit data: class counts, bad files, duplicates and leakage")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    dc = data_sub.add_parser(
        "check", help="audit an image folder or every domain of a config (see docs/data-check.md)",
        epilog="Exit status: 0 nothing found that would corrupt an evaluation; 3 problems found (corrupt files, a\n"
               "class with < 2 images, duplicates across splits or stages, one image under two classes); 2 a usage\n"
               "error; 1 an internal error (a bug).\n\n"
               "examples:\n  mltl data check data/ct_kidney\n"
               "  mltl data check data/ct_kidney --group-near-duplicates\n"
               "  mltl data check examples/kidney_ct.toml --json > audit.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    dc.add_argument("target", metavar="PATH_OR_CONFIG", help="a folder with one sub-folder per class, or a config .toml")
    dc.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config only: override a config key, as for mltl run (repeatable)")
    dc.add_argument("--json", action="store_true", help="print the whole report as JSON instead of tables")
    dc.add_argument("--classes", help="folder only: comma-separated class sub-folders (default all)")
    dc.add_argument("--val", type=float, default=0.2, help="folder only: validation fraction of the split checked (default: 0.2)")
    dc.add_argument("--test", type=float, default=0.2, help="folder only: test fraction of the split checked (default: 0.2)")
    dc.add_argument("--seed", type=int, default=0, help="folder only: split seed (default: 0)")
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
                                "  mltl report runs/rare-liver --option evaluation.case_aggregate=max "
                                "--option gradcam.per_class=4",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    rep.add_argument("run_dir", help="the run directory (holds config.toml)")
    rep.add_argument("--option", dest="options", action="append", default=[], metavar="REPORTER.KEY=VALUE",
                     help="a reporter option, e.g. evaluation.case_aggregate=max, roc.n_resamples=2000 (repeatable)")
    rep.add_argument("--set", dest="deprecated_options", action="append", default=[], metavar="REPORTER.KEY=VALUE",
                     help="deprecated spelling of --option (--set means a config key elsewhere); removed in the "
                          "next release")
    rep.add_argument("--reporters", help="comma-separated reporters to replay; default the run's [run] reporters "
                                         "(all installed when unset)")

    cfg = sub.add_parser("config", help="inspect a config: print it resolved, with --set overrides and defaults")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    cs = cfg_sub.add_parser(
        "show", help="print the resolved configuration as TOML (overrides applied, defaults filled in)",
        epilog="Prints the config as `mltl run` would read it: the file, then every --set override, then every key\n"
               "left out filled in with its default (keys whose default is 'unset', such as split.seed, stay out).\n"
               "The output is itself a valid config. Nothing is checked beyond the config itself (no plugins,\n"
               "no data): use mltl validate for that.\n\n"
               "examples:\n  mltl config show examples/rare_liver.toml --set stages.target.train.epochs=3\n"
               "  mltl config show examples/rare_liver.toml --no-defaults > resolved.toml",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    cs.add_argument("config", help="the stage-list TOML file")
    cs.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    cs.add_argument("--no-defaults", action="store_true",
                    help="print only the file and its overrides, without the defaults filled in")

    comp = sub.add_parser(
        "completion", help="print a shell completion script (bash, zsh or fish)",
        epilog="examples:\n  mltl completion bash > ~/.local/share/bash-completion/completions/mltl\n"
               "  mltl completion zsh > ~/.zfunc/_mltl     # with fpath+=(~/.zfunc) before compinit\n"
               "  mltl completion fish > ~/.config/fish/completions/mltl.fish",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    comp.add_argument("shell", choices=("bash", "zsh", "fish"), help="the shell to complete in")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.quiet:
        os.environ["MLTL_QUIET"] = "1"
    if args.command is None:
        _parser().print_help()
        return EXIT_USER_ERROR
    commands = {"rank": _rank, "run": _run, "compare": _compare, "predict": _predict, "validate": _validate,
                "plugins": _plugins, "export": _export, "new-plugin": _new_plugin, "report": _report, "data": _data,
                "config": _config, "completion": _completion}
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("mltl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 -- the one top-level guard (module docstring)
        message = user_message(exc)
        if message is None:
            return _internal_error(exc)
        print(f"mltl: error: {one_line(message)}", file=sys.stderr)
        return EXIT_USER_ERROR


MAX_MESSAGE = 2000  # characters of a one-line error message

# operating-system errors that the user's machine or input causes, never mltl's code
USER_ERRNOS = {getattr(errno, name) for name in (
    "EACCES", "EPERM", "EROFS", "ENOSPC", "EDQUOT", "EFBIG", "ENOENT", "ENOTDIR", "EISDIR", "ENAMETOOLONG",
    "EEXIST", "ENOTEMPTY", "ELOOP", "EBUSY", "ETXTBSY", "EMFILE", "ENFILE", "EIO", "ENXIO", "ENODEV", "EXDEV",
    "ESTALE", "EINVAL", "ENOMEM") if hasattr(errno, name)}


def user_message(exc: BaseException) -> str | None:
    """The one-line message for an exception the user caused, or None for a bug in mltl (or a plugin)."""
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return (f"disk full while writing {exc.filename or 'the run directory'}: free space and "
                f"continue with `mltl run CONFIG --resume --out RUN_DIR`")
    if isinstance(exc, OSError) and exc.errno in USER_ERRNOS and (exc.errno != errno.EINVAL or exc.filename):
        what = exc.strerror or str(exc)
        where = exc.filename if exc.filename is not None else ""
        if exc.filename2 is not None:
            where = f"{where} -> {exc.filename2}"
        hint = {errno.EACCES: "; check the permissions, or choose another folder (--out)",
                errno.EPERM: "; check the permissions, or choose another folder (--out)",
                errno.EROFS: "; choose a folder on a writable disk (--out)"}.get(exc.errno, "")
        return f"{where}: {what}{hint}" if where else f"{what}{hint}"
    if isinstance(exc, MemoryError):
        return ("out of memory: lower [input] size, stages.<name>.train.batch_size or the data's size (or set "
                "[run] host_memory_budget_gb), then continue with `mltl run CONFIG --resume --out RUN_DIR`")
    if isinstance(exc, RuntimeError) and not isinstance(exc, RecursionError):
        text = str(exc).lower()
        if "out of memory" in text:  # torch.cuda.OutOfMemoryError is a RuntimeError
            return ("out of GPU memory: lower stages.<name>.train.batch_size (or [input] size), "
                    "then continue with `mltl run CONFIG --resume --out RUN_DIR`")
        if "can't allocate memory" in text or "defaultcpuallocator" in text:
            return ("out of memory: lower [input] size, stages.<name>.train.batch_size or the head's dense "
                    "widths, then continue with `mltl run CONFIG --resume --out RUN_DIR`")
    return None


def one_line(text: str) -> str:
    """``text`` as one line: line breaks and other control characters escaped, at most MAX_MESSAGE characters."""
    text = "".join(c if c.isprintable() or c == " " else ascii(c)[1:-1] for c in str(text))
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 3] + "..."


def _internal_error(exc: BaseException) -> int:
    traceback.print_exception(exc)
    print(f"mltl: internal error: {one_line(f'{type(exc).__name__}: {exc}')[:300]}; this is a bug in mltl or a "
          f"plugin, not in your input: please report it to the mltl maintainers with the traceback above, "
          f"the command and `mltl --version`", file=sys.stderr)
    return EXIT_INTERNAL_ERROR


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

    from ..deploy.predict import check_csv_path, load_stage, predict, write_predictions_csv
    from ..running.preflight import resolve_device

    if args.batch_size < 1:
        raise UserError(f"predict: --batch-size must be 1 or more, got {args.batch_size}")
    if args.csv:
        check_csv_path(args.csv)  # before any work: never over a run's own files
    stage = load_stage(args.stage)
    rows = list(predict(stage, args.images, device=str(resolve_device(args.device)), batch_size=args.batch_size))
    if args.csv:
        write_predictions_csv(args.csv, rows, stage.classes)
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

    from ..config import SEED_MAX
    from ..data.datacheck import check_config, check_folder, render

    if not 0 <= args.seed <= SEED_MAX:
        raise UserError(f"data check: --seed must be from 0 to {SEED_MAX} (2**32 - 1), got {args.seed}")
    target = Path(args.target)
    if target.is_dir():
        for name, value in (("--val", args.val), ("--test", args.test)):
            if not 0 < value < 1:  # NaN fails this too
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
    return EXIT_OK if report["ok"] else EXIT_FINDINGS


def _validate(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..running.preflight import prepare

    config = load_config(args.config, args.overrides)
    chain = prepare(config)  # what `mltl run` checks before training: reads every image, leakage, every split
    n = sum(len(s.variants) for s in config.stages)
    baseline = ""
    if config.baseline is not None:
        n += len(config.baseline.variants)
        baseline = f" and the baseline {config.baseline.name}"
    images = sum(len(d) for d in chain.domains.values())
    print(f"{args.config}: OK ({len(config.stages)} stages{baseline}, {n} variants to train, "
          f"{images} images readable)")
    return 0


def _rank(args: argparse.Namespace) -> int:
    from rich.table import Table

    from ..config import load_config
    from ..evaluation.rank import rank, ranking_json
    from ..running.preflight import resolve_device
    from ..running.rundir import write_text_atomic

    config = load_config(args.config, args.overrides)
    device = resolve_device(args.device or config.run.device)
    rows, info = rank(config, args.candidates, stage=args.stage, device=str(device),
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
    if getattr(args, "name", None):
        return _plugin_options(registry, args.name)
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


def _plugin_options(registry, name: str) -> int:
    """``mltl plugins NAME``: what NAME is, which plugin provides it, and its options with types and defaults."""
    import inspect

    from rich.table import Table

    from ..plugins import RESERVED_OPTIONS, describe_options

    kinds = ("domain", "backbone", "freeze policy", "reporter")
    found = [registry.get(kind, name) for kind in kinds if name in registry.names(kind)]
    if not found:
        every = [n for kind in kinds for n in registry.names(kind)]
        raise UserError(f'mltl plugins: no domain, backbone, freeze policy or reporter is named "{name}"'
                        f"{did_you_mean(name, every)}; `mltl plugins` lists them")
    console = make_console(min_width=100)
    for item in found:
        doc = inspect.getdoc(item.factory) or ""
        console.print(f"[bold]{item.kind} {item.name}[/bold] (plugin {item.plugin})"
                      + (" [opt-in: name it in [run] reporters]" if getattr(item, "opt_in", False) else ""))
        if doc:
            console.print(doc.split("\n\n")[0], markup=False, highlight=False)
        options = describe_options(item.factory, RESERVED_OPTIONS.get(item.kind, ()))
        if not options:
            console.print("no options")
            continue
        table = Table(show_header=True)
        for col in ("option", "type", "default"):
            table.add_column(col)
        for opt in options:
            table.add_row(opt.name, opt.type, opt.default)
        console.print(table)
        where = {"domain": "stages.NAME.domain = { plugin = ..., OPTION = ... }",
                 "backbone": "stages.NAME.backbone = { name = ..., OPTION = ... }",
                 "reporter": "[run] reporter_options = { NAME = { OPTION = ... } }"}.get(item.kind)
        if where:
            console.print(f"set in a config as {where}", markup=False, highlight=False)
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

    options = [*args.deprecated_options, *args.options]
    for item in options:
        key, sep, _ = item.partition("=")
        reporter, dot, option = key.strip().partition(".")
        if not (sep and dot and reporter and option) or "." in option:
            raise UserError(f"--option {item!r}: write REPORTER.KEY=VALUE, e.g. evaluation.case_aggregate=max")
    names = None if args.reporters is None else [n.strip() for n in args.reporters.split(",") if n.strip()]
    done = regenerate(args.run_dir, reporter_options=parse_reporter_options(options), reporters=names)
    if args.deprecated_options:  # after the work: a failing command's stderr stays its one error line
        print("mltl: warning: `mltl report --set` is deprecated and will be removed in the next release; "
              "use --option REPORTER.KEY=VALUE (--set means a config key in every other command)", file=sys.stderr)
    print(f"{done.run_dir}: reported {len(done.finished)} finished stage(s)"
          + (f"; unfinished: {', '.join(done.unfinished)}" if done.unfinished else "")
          + f" (reporters: {', '.join(done.reporters) or 'none'})")
    print(RunFiles(done.run_dir).report_html)
    return 0



def _config(args: argparse.Namespace) -> int:
    from ..config import dump_toml, load_config

    config = load_config(args.config, args.overrides)  # every override checked like the file
    raw = config.raw if args.no_defaults else with_defaults(config.raw)
    sys.stdout.write(dump_toml(raw))
    return EXIT_OK


def with_defaults(raw: dict) -> dict:
    """A copy of a config's TOML (``Config.raw``) with every key it leaves out set to its default.

    Defaults that mean "unset" (None, such as ``split.seed``: the run seed) are left out, as TOML has no null;
    a swept value (``{ sweep = [...] }``) is kept as written, and a table that is swept whole is not filled in.
    """
    import copy

    import attrs

    from ..config import InputConfig, RunSection, SplitConfig, StageConfig, TrainConfig

    def defaults(cls: type) -> dict:
        out = {}
        for f in attrs.fields(cls):
            if f.default is attrs.NOTHING:
                continue
            value = f.default.factory() if isinstance(f.default, attrs.Factory) else f.default  # type: ignore[attr-defined]
            if attrs.has(type(value)):
                value = attrs.asdict(value)
            value = _toml_value(value)
            if value is not None:
                out[f.name] = value
        return out

    def fill(table: object, cls: type) -> object:
        if not isinstance(table, dict) or "sweep" in table:
            return table
        return {**table, **{k: v for k, v in defaults(cls).items() if k not in table}}

    out = copy.deepcopy(raw)
    for key, cls in (("run", RunSection), ("input", InputConfig)):
        out[key] = fill(out.get(key, {}), cls)
    stages = []
    for stage in out.get("stages", []):
        if isinstance(stage, dict):
            stage = {**stage, **{k: v for k, v in defaults(StageConfig).items() if k not in stage}}
            for key, cls in (("split", SplitConfig), ("train", TrainConfig)):
                stage[key] = fill(stage[key], cls)
        stages.append(stage)
    if stages:
        out["stages"] = stages
    order = [k for k in ("run", "input", "stages") if k in out]  # the file's own order of the top level
    return {k: out[k] for k in order} | {k: v for k, v in out.items() if k not in order}


def _toml_value(value: object) -> object:
    """A default as TOML can hold it: tuples as lists, None left out of tables (None itself for "leave out")."""
    if isinstance(value, (tuple, list)):
        return [_toml_value(v) for v in value if v is not None]
    if isinstance(value, dict):
        return {k: _toml_value(v) for k, v in value.items() if v is not None}
    return value


def _completion(args: argparse.Namespace) -> int:
    from .completion import completion_script

    sys.stdout.write(completion_script(_parser(), args.shell))
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
