"""Write pip constraints that pin every declared dependency floor (used by .ci/floors).

Reads ``project.dependencies`` (and the ``test`` extra) of pyproject.toml and plugins/*/pyproject.toml and
prints one ``name==floor`` line per package, so that the floors job installs exactly the oldest versions the
project says it supports. torch and torchvision are the exception: this machine installs only its local
builds, so they are pinned to requirements.txt's versions, and the declared floor (what the GPU machine
runs) must not be above them. Fails, naming the files, when:

- two files declare different floors for one package (a floor lower than another file's is never tested);
- the declared ``requires-python`` floor is not the running interpreter's version (the floor is what runs).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: installed at requirements.txt's pins, not at their floors (see .ci/floors)
LOCAL_BUILDS = ("torch", "torchvision")
_REQ = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*?)\s*(;.*)?$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _floor(spec: str) -> str | None:
    for part in spec.split(","):
        part = part.strip()
        if part.startswith(">="):
            return part[2:].strip()
    return None


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0]))


def main() -> int:
    files = [ROOT / "pyproject.toml", *sorted(ROOT.glob("plugins/*/pyproject.toml"))]
    floors: dict[str, dict[str, str]] = {}  # package -> {file: floor}
    pythons: dict[str, str] = {}
    for path in files:
        project = tomllib.loads(path.read_text())["project"]
        where = str(path.relative_to(ROOT))
        pythons[where] = project.get("requires-python", "")
        for req in [*project.get("dependencies", []), *project.get("optional-dependencies", {}).get("test", [])]:
            name, _, spec, _ = _REQ.match(req).groups()
            if _norm(name).startswith("mltl"):
                continue  # the project's own packages, installed from the tree
            floor = _floor(spec)
            if floor is not None:
                floors.setdefault(_norm(name), {})[where] = floor
    problems = []
    for name, by_file in sorted(floors.items()):
        if len(set(by_file.values())) > 1:
            problems.append(f"{name}: different floors " + ", ".join(f"{f} >={v}" for f, v in by_file.items()))
    running = f"{sys.version_info.major}.{sys.version_info.minor}"
    for where, spec in pythons.items():
        if _floor(spec) != running:
            problems.append(f"{where}: requires-python {spec!r}, but the floors job runs Python {running}")
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        m = re.match(r"^(torch|torchvision)==(\S+)", line.strip())
        if m:
            pins[m.group(1)] = m.group(2)
    for name in LOCAL_BUILDS:
        floor = next(iter(floors.get(name, {}).values()), None)
        if name not in pins:
            problems.append(f"{name}: requirements.txt pins no version")
        elif floor is not None and _version_tuple(floor) > _version_tuple(pins[name]):
            problems.append(f"{name}: floor {floor} is above the installed {pins[name]}")
    if problems:
        print("floors: " + "; ".join(problems), file=sys.stderr)
        return 1
    for name, by_file in sorted(floors.items()):
        version = pins[name] if name in LOCAL_BUILDS else next(iter(by_file.values()))
        print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
