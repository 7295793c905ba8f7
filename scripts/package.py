"""``make package``: the plugin ZIP that QGIS installs with Plugins > Install from ZIP.

Writes ``dist/virefsam-<version>.zip`` (version from metadata.txt) with one top folder ``virefsam/``: the plugin
code (``__init__.py``, ``plugin.py``, ``core/``, ``ui/``), ``metadata.txt``, ``LICENSE``, ``README.md``,
``requirements.txt`` (the in-QGIS installer reads it) and ``resources/`` (icon, shipped adapters, demo samples).
Never: tests, scripts, docs, caches, virtual environments, build outputs, the adapters' evaluation records
(``resources/adapters/<folder>/``), and no weights but ``resources/adapters/*.pt``. The metadata is checked against what the official plugin repository
(plugins.qgis.org) requires before anything is written.

Why not qgis-plugin-ci: it packages ``git archive`` of a plugin *sub*folder and renames paths with
``str.replace(plugin_path, zip_folder)``; with the repository root as the plugin (``plugin_path = "."``) that
replaces every dot of every file name, and it edits metadata.txt in the working tree and then resets it with
``git checkout -- .`` / ``git reset --hard``, which discards a developer's uncommitted work. This file is the
small part of it that is needed: the file list (git's, or a walk when the source is not a git checkout), the
metadata check and the ZIP.
"""

from __future__ import annotations

import argparse
import configparser
import fnmatch
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Iterable, List

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_FOLDER = "virefsam"

# What the plugin needs at run time (prefixes of repository paths).
INCLUDE = ("__init__.py", "plugin.py", "metadata.txt", "LICENSE", "README.md", "requirements.txt",
           "core/", "ui/", "resources/")
EXCLUDE_PARTS = {"__pycache__", ".pytest_cache", ".hypothesis", ".venv", "venv", ".git", "out", "dist", "build",
                 ".cache", "tests", "scripts", "docs"}
EXCLUDE_NAMES = ("*.pyc", "*.pyo", "*.orig", "*.rej", "*.swp", "*~", ".DS_Store", "*.part")
WEIGHTS = ("*.pt", "*.pth", "*.onnx", "*.safetensors", "*.bin", "*.ckpt")
ALLOWED_WEIGHTS = ("resources/adapters/*.pt",)
# the adapters' evaluation records (eval JSON, experiment patches and scripts in resources/adapters/<folder>/) stay
# in the repository: the plugin needs the weights and the model card beside them, not the research trail
RECORDS = "resources/adapters/"

# plugins.qgis.org: mandatory metadata (its validator refuses a package without them) and recommended ones.
REQUIRED = ("name", "qgisMinimumVersion", "description", "about", "version", "author", "email", "repository",
            "tracker")
RECOMMENDED = ("homepage", "tags", "category", "icon", "experimental", "changelog")


class PackageError(Exception):
    pass


def read_metadata(root: Path = ROOT) -> configparser.SectionProxy:
    cp = configparser.ConfigParser(interpolation=None)
    cp.optionxform = str  # keys are case-sensitive (qgisMinimumVersion)
    if not cp.read(root / "metadata.txt", encoding="utf-8") or "general" not in cp:
        raise PackageError("metadata.txt is missing or has no [general] section.")
    return cp["general"]


def check_metadata(meta, root: Path = ROOT) -> List[str]:
    """One sentence per problem that plugins.qgis.org would refuse; warnings for missing recommended keys."""
    problems = [f"metadata.txt lacks the mandatory '{k}'." for k in REQUIRED if not meta.get(k, "").strip()]
    for key in ("repository", "tracker", "homepage"):
        value = meta.get(key, "").strip()
        if value and not value.startswith(("https://", "http://")):
            problems.append(f"metadata.txt's '{key}' is not a URL: {value}")
    if "@" not in meta.get("email", ""):
        problems.append("metadata.txt's 'email' is not an e-mail address.")
    icon = meta.get("icon", "").strip()
    if icon and not (root / icon).is_file():
        problems.append(f"metadata.txt names the icon {icon}, which does not exist.")
    if not (root / "LICENSE").is_file():
        problems.append("The LICENSE file is missing (plugins.qgis.org requires one in the package).")
    return problems


def candidate_files(root: Path = ROOT) -> List[str]:
    """Repository paths (posix): git's tracked and untracked-not-ignored files, else every file under root."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, check=True).stdout.decode("utf-8")
        names = [n for n in out.split("\0") if n and (root / n).is_file()]
    except (OSError, subprocess.CalledProcessError):
        names = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    return sorted(set(names))


def wanted(name: str) -> bool:
    parts = name.split("/")
    if not name.startswith(INCLUDE) or any(p in EXCLUDE_PARTS for p in parts[:-1]):
        return False
    if any(p.startswith(".") for p in parts) or any(fnmatch.fnmatch(parts[-1], pat) for pat in EXCLUDE_NAMES):
        return False
    if name.startswith(RECORDS) and len(parts) > 3:
        return False
    if any(fnmatch.fnmatch(parts[-1], pat) for pat in WEIGHTS):
        return any(fnmatch.fnmatch(name, pat) for pat in ALLOWED_WEIGHTS)
    return True


def build(out_dir: Path, root: Path = ROOT, files: Iterable[str] = None) -> Path:
    meta = read_metadata(root)
    problems = check_metadata(meta, root)
    if problems:
        raise PackageError(" ".join(problems))
    names = [n for n in (files if files is not None else candidate_files(root)) if wanted(n)]
    zip_path = Path(out_dir) / f"{PLUGIN_FOLDER}-{meta['version'].strip()}.zip"
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = zip_path.with_name(zip_path.name + ".part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name in names:
            zf.write(root / name, f"{PLUGIN_FOLDER}/{name}")
    tmp.replace(zip_path)
    return zip_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "dist"), help="output folder (default: dist/)")
    args = parser.parse_args(argv)
    try:
        meta = read_metadata()
        for key in RECOMMENDED:
            if not meta.get(key, "").strip():
                print(f"package: note: metadata.txt has no '{key}' (recommended by plugins.qgis.org)")
        path = build(Path(args.out))
    except PackageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with zipfile.ZipFile(path) as zf:
        count = len(zf.namelist())
        unpacked = sum(i.file_size for i in zf.infolist())
    print(f"package: {path} ({path.stat().st_size / 1e6:.1f} MB, {count} files, {unpacked / 1e6:.1f} MB unpacked)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
