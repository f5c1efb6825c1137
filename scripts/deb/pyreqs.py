"""Python dependencies of the Debian package's private venv (used by scripts/deb/build).

    pyreqs.py split WHEEL SYSTEM_NAME...
        Reads the sandgate wheel's requirements (extras and other platforms' left out)
        and prints one line per requirement: "venv REQ" (to install into the venv from
        wheels) or "system NAME SPEC" (left to a Debian package: NAME is one of
        SYSTEM_NAME).
    pyreqs.py closure VENV SYSTEM_NAME...
        Walks sandgate's installed dependency closure as VENV's python sees it and
        fails unless every dependency is installed in VENV, except SYSTEM_NAME ones,
        which must come from outside it (Debian's dist-packages); prints each
        dependency with its version and where it is.
    pyreqs.py imports
        Run with the venv's python: imports every module of sandgate's packages, and
        nftables (python3-nftables).
    pyreqs.py rehash SITE_PACKAGES FILE...
        Updates the size and hash of each FILE (changed after installation: stripped)
        in the RECORD of the distribution that lists it.

split and closure run under a venv with pip, whose vendored `packaging` parses
requirements and evaluates their markers; the Python is the one the package's venv
is made from, so the markers see the same environment.
"""

from __future__ import annotations

import base64
import csv
import email.parser
import hashlib
import importlib
import importlib.metadata as md
import io
import json
import os
import pkgutil
import re
import subprocess
import sys
import zipfile

PACKAGES = ("runner", "netns", "nft", "gateway")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def applies(requirement: str) -> tuple[str, str] | None:
    """(canonical name, version specifier) of a requirement that applies to a plain
    install on this Python and platform; None for extras and other platforms."""
    from pip._vendor.packaging.requirements import Requirement

    req = Requirement(requirement)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        return None
    return canonical(req.name), str(req.specifier)


def wheel_requires(path: str) -> list[str]:
    with zipfile.ZipFile(path) as whl:
        (meta,) = [n for n in whl.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
        msg = email.parser.BytesParser().parsebytes(whl.read(meta))
    return msg.get_all("Requires-Dist") or []


def split(wheel: str, system: set[str]) -> int:
    for requirement in wheel_requires(wheel):
        parsed = applies(requirement)
        if parsed is None:
            continue
        name, spec = parsed
        if name in system:
            print(f"system {name} {spec}")
        else:
            print(f"venv {name}{spec}")
    return 0


def closure(venv: str, system: set[str]) -> int:
    venv = venv.rstrip("/")
    path = json.loads(
        subprocess.run(
            [f"{venv}/bin/python", "-c", "import json, sys; print(json.dumps(sys.path[1:]))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    found = {canonical(d.metadata["Name"]): d for d in reversed(list(md.distributions(path=path)))}
    errors = []
    seen: set[str] = set()
    todo = [("sandgate", "")]
    while todo:
        name, spec = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        dist = found.get(name)
        if dist is None:
            errors.append(f"{name}{spec}: not installed")
            continue
        where = str(dist.locate_file("")).rstrip("/")
        inside = where.startswith(venv + "/")
        if name != "sandgate":
            print(f"{name} {dist.version} {where}")
        from pip._vendor.packaging.specifiers import SpecifierSet

        if not SpecifierSet(spec).contains(dist.version, prereleases=True):
            errors.append(f"{name}: {dist.version} installed, {spec} needed")
        if name in system:
            if inside:
                errors.append(f"{name}: installed in the venv, but it must come from Debian")
            continue  # its own dependencies are its Debian package's business
        if not inside:
            errors.append(f"{name}: found in {where}, not in the venv (an undeclared dependency)")
        for requirement in dist.requires or []:
            parsed = applies(requirement)
            if parsed is not None:
                todo.append(parsed)
    for error in errors:
        print(f"pyreqs: {error}", file=sys.stderr)
    return 1 if errors else 0


def imports() -> int:
    errors = []
    names = ["nftables"]
    for package in PACKAGES:
        module = importlib.import_module(package)
        names += [m.name for m in pkgutil.walk_packages(module.__path__, f"{package}.")]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # any failure to import is the finding
            errors.append(f"import {name}: {exc!r}")
    for error in errors:
        print(f"pyreqs: {error}", file=sys.stderr)
    return 1 if errors else 0


def rehash(site: str, files: list[str]) -> int:
    wanted = {os.path.relpath(f, site): f for f in files}
    for record in sorted(p for p in os.listdir(site) if p.endswith(".dist-info")):
        path = os.path.join(site, record, "RECORD")
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        changed = False
        for row in rows:
            if row[0] in wanted:
                with open(wanted.pop(row[0]), "rb") as f:
                    data = f.read()
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
                row[1:] = [f"sha256={digest.decode()}", str(len(data))]
                changed = True
        if changed:
            out = io.StringIO()
            csv.writer(out, lineterminator="\n").writerows(rows)
            with open(path, "w") as f:
                f.write(out.getvalue())
    for rel in wanted:
        print(f"pyreqs: {rel}: in no RECORD", file=sys.stderr)
    return 1 if wanted else 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["imports"]:
        return imports()
    if argv[:1] == ["rehash"] and len(argv) >= 2:
        return rehash(argv[1], argv[2:])
    if len(argv) < 2 or argv[0] not in ("split", "closure"):
        print(__doc__, file=sys.stderr)
        return 2
    system = {canonical(n) for n in argv[2:]}
    return split(argv[1], system) if argv[0] == "split" else closure(argv[1], system)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
