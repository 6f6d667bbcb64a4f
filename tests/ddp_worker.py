"""A torchrun worker for tests/test_ddp.py: `mltl` with an audit hook that records every write under a folder.

Each rank appends what it opened for writing, created, renamed or removed under ``MLTL_TEST_WATCH`` to
``MLTL_TEST_WRITES.<rank>`` (a JSON list, written at exit), so the test can check that only rank 0 wrote
the run directory and that the hook did see rank 0's writes.
"""

import atexit
import json
import os
import sys

WATCH = os.path.realpath(os.environ["MLTL_TEST_WATCH"])
LOG = f"{os.environ['MLTL_TEST_WRITES']}.{os.environ.get('RANK', '0')}"
seen: list[str] = []
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _under(path) -> bool:
    if isinstance(path, int):
        return False
    try:
        p = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return False
    return p == WATCH or p.startswith(WATCH + os.sep)


def hook(event: str, args: tuple) -> None:
    if event == "open":
        path, mode, flags = args
        writing = (any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & WRITE_FLAGS))
        if writing and _under(path):
            seen.append(f"open {path}")
    elif event in ("os.mkdir", "os.rmdir", "os.remove", "os.chmod", "os.truncate"):
        if _under(args[0]):
            seen.append(f"{event} {args[0]}")
    elif event == "os.rename":
        if _under(args[0]) or _under(args[1]):
            seen.append(f"{event} {args[0]} -> {args[1]}")


events: list[str] = []  # the run-event hooks this rank's plugins were called with


def _dump() -> None:
    with open(LOG, "w") as f:
        json.dump(seen, f)
    with open(f"{os.environ['MLTL_TEST_WRITES']}.events.{os.environ.get('RANK', '0')}", "w") as f:
        json.dump(events, f)


atexit.register(_dump)
sys.addaudithook(hook)

import mltl  # noqa: E402
from mltl.cli import main  # noqa: E402


class _EventLog:
    @mltl.hookimpl
    def mltl_stage_finished(self, result):
        events.append(f"stage_finished {result.name}")

    @mltl.hookimpl
    def mltl_epoch_ended(self, stage_name, variant, epoch, metrics):
        events.append(f"epoch_ended {stage_name} {epoch}")


mltl.register_plugin(_EventLog(), name="test-event-log")

sys.exit(main(sys.argv[1:]))
