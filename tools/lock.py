"""The lock of the tested package set (constraints.txt): write it, and filter it for install.sh.

    python tools/lock.py freeze OUT     # OUT <- exact versions of this environment's packages
    python tools/lock.py effective LOCK OUT
        # OUT <- LOCK minus the packages a kept torch depends on, when the torch installed
        # here is not the lock's (e.g. a CUDA build on a GPU machine): that torch and its
        # own requirements (triton, nvidia-*, ...) stay as they are; everything else follows
        # the lock.

Runs on the interpreter that install.sh uses; standard library only.
"""

from __future__ import annotations

import datetime
import importlib.metadata as md
import platform
import re
import sys
from pathlib import Path

SKIP = {"pip", "e3pruner"}  # the installer itself; the project (installed editable)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    out = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name and canonical(name) not in SKIP:
            out[canonical(name)] = dist.version
    return out


def public(version: str) -> str:
    """2.13.0+cpu -> 2.13.0: a constraint `==2.13.0` admits every local build of it."""
    return version.split("+", 1)[0]


def freeze(out: Path) -> None:
    pkgs = installed()
    head = [
        "# The tested set: exact versions of every package install.sh installs (direct and",
        "# transitive). install.sh installs with `pip install -c constraints.txt` unless",
        "# E3_UNLOCKED=1. Regenerate with tools/update_lock.sh; check tomorrow's releases",
        "# with tools/check_latest.sh.",
        f"# Made {datetime.date.today().isoformat()} on Python {platform.python_version()}, "
        f"{platform.system()} {platform.machine()}.",
    ]
    lines = [f"{n}=={public(v)}" for n, v in sorted(pkgs.items())]
    out.write_text("\n".join(head + lines) + "\n")
    print(f"wrote {out}: {len(lines)} packages")


def parse(lock: Path) -> list[tuple[str, str, str]]:
    rows = []
    for line in lock.read_text().splitlines():
        s = line.split("#", 1)[0].strip()
        if not s:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*(\S+)", s)
        if m is None:
            sys.exit(f"{lock}: cannot read the line {line!r} (expected NAME==VERSION)")
        rows.append((canonical(m.group(1)), m.group(2), s))
    return rows


def torch_closure() -> set[str]:
    """torch and every package it requires, transitively, as installed here."""
    seen, todo = set(), ["torch"]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for r in reqs:
            if "extra ==" in r:
                continue
            m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", r)
            if m:
                todo.append(canonical(m.group(1)))
    return seen


def effective(lock: Path, out: Path) -> None:
    rows = parse(lock)
    want = {n: v for n, v, _ in rows}
    have = installed()
    drop: set[str] = set()
    if "torch" in have and "torch" in want and public(have["torch"]) != public(want["torch"]):
        drop = torch_closure()
        print(f"keeping the installed torch {have['torch']} (the lock has {want['torch']}): "
              f"its own requirements are not constrained ({', '.join(sorted(drop))})")
    out.write_text("\n".join(s for n, _, s in rows if n not in drop) + "\n")


def main(argv: list[str]) -> None:
    if len(argv) == 2 and argv[0] == "freeze":
        freeze(Path(argv[1]))
    elif len(argv) == 3 and argv[0] == "effective":
        effective(Path(argv[1]), Path(argv[2]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
