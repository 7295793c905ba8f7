"""pip into the plugin's own folder, run and watched from Python (standard library only: no Qt, no QGIS).

:func:`install` does the whole job that the dock's "Install dependencies" runs in a ``QgsTask``
(``ui.installer``); tests call it directly:

1. checks first, each ending in one sentence: pip present, the package index reachable, enough free disk (the
   amount needed is said);
2. ``constraints.txt`` from the versions of QGIS's own packages importable in this Python (numpy, GDAL, PyQt5,
   shapely, rasterio, scipy, ...): pip may not install another version of them, and the requirements leave out
   what QGIS already provides;
3. ``python -m pip install --target <folder> -c constraints.txt --prefer-binary ...`` with PyTorch's CPU wheels
   (or the CUDA build when an NVIDIA driver answers ``nvidia-smi``), its output parsed for progress and written
   to a log file the user can open; cancelling kills pip;
4. the copies pip put into the folder of packages QGIS provides (same versions, by the constraints) are taken
   out, so that QGIS's numpy stays the one imported;
5. a fresh Python with the start-up ``sys.path`` imports the engine's packages and must find QGIS's numpy;
6. only then the marker (:mod:`.deps_folder`) is written.
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from . import deps_folder

PLUGIN_DIR = Path(__file__).resolve().parent.parent
REQUIREMENTS = PLUGIN_DIR / "requirements.txt"

# Packages QGIS ships (distribution name -> module): never installed again, never upgraded.
QGIS_PROVIDED: Dict[str, str] = {
    "numpy": "numpy", "GDAL": "osgeo", "PyQt5": "PyQt5", "PyQt5-sip": "PyQt5.sip", "shapely": "shapely",
    "rasterio": "rasterio", "scipy": "scipy", "pyproj": "pyproj", "Fiona": "fiona", "pandas": "pandas",
    "matplotlib": "matplotlib", "Pillow": "PIL", "h5py": "h5py", "netCDF4": "netCDF4", "psycopg2": "psycopg2",
    "lxml": "lxml",
}
# Build tools pulled in by torch's metadata but not used by the engine: QGIS's own copies stay the ones imported
# (a newer setuptools first on sys.path could hide pkg_resources from QGIS and other plugins).
BUILD_TOOLS = ("setuptools", "pip", "wheel")
# The engine's modules, imported by the check after install (module names).
CHECK_MODULES = ("numpy", "torch", "torchvision", "segment_anything", "mobile_sam", "timm", "onnx", "onnxruntime")

PYPI = "https://pypi.org/simple"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TORCH_CUDA_INDEX = "https://download.pytorch.org/whl/cu128"  # Windows; Linux's PyPI torch is the CUDA build
# Room needed while installing (downloaded wheels + unpacked packages; no pip cache is kept). Estimates: the CUDA
# set of this project's venv takes 5.5 GB installed (torch 1.2, nvidia 3.2, triton 0.9 GB); the CPU wheels of
# torch are far smaller. Not measured for the CPU set (download.pytorch.org is unreachable from the dev machine).
NEEDED_BYTES = {"cpu": 2_500_000_000, "cuda": 9_000_000_000}

Progress = Optional[Callable[[float, str], None]]
Cancelled = Optional[Callable[[], bool]]


class InstallError(Exception):
    """str(e) is one sentence for the user."""


class InstallCancelled(InstallError):
    pass


@dataclass
class Plan:
    """What :func:`install` does; :func:`make_plan` fills it for the engine, tests give a small package."""

    folder: Path
    requirements: List[str]
    constraints: List[str]
    variant: str = "cpu"  # "cpu" | "cuda" | "none" (no torch among the requirements)
    index_args: List[str] = field(default_factory=list)
    check_modules: Sequence[str] = CHECK_MODULES
    python: str = ""
    needed_bytes: int = NEEDED_BYTES["cpu"]

    @property
    def log_path(self) -> Path:
        return self.folder.parent / f"install-{self.folder.name}.log"

    @property
    def constraints_path(self) -> Path:
        return self.folder.parent / f"constraints-{self.folder.name}.txt"


# -- what to install ---------------------------------------------------------------------------------------------
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_PEP440 = re.compile(r"^\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_requirements(path: Path = REQUIREMENTS) -> List[str]:
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            out.append(line)
    return out


def qgis_versions() -> Dict[str, str]:
    """``{distribution: version}`` of the QGIS-provided packages importable in this Python."""
    from importlib import metadata

    found = {}
    for dist, module in QGIS_PROVIDED.items():
        try:
            if importlib.util.find_spec(module.split(".")[0]) is None:
                continue
        except (ImportError, ValueError):
            continue
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            version = str(getattr(sys.modules.get(module), "__version__", "") or "")
        version = version.split("+")[0]
        if _PEP440.match(version):
            found[dist] = version
    return found


def constraints_for(versions: Dict[str, str]) -> List[str]:
    return [f"{d}=={v}" for d, v in sorted(versions.items(), key=lambda kv: kv[0].lower())]


def requirements_without(requirements: Sequence[str], provided: Sequence[str]) -> List[str]:
    """The requirements less those QGIS provides (their version is QGIS's, pinned by the constraints)."""
    have = {canonical(p) for p in provided}
    out = []
    for req in requirements:
        m = _NAME.match(req)
        if m and canonical(m.group(1)) not in have:
            out.append(req)
    return out


def nvidia_driver() -> bool:
    """Whether an NVIDIA driver answers (``nvidia-smi -L`` lists a GPU)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return False
    try:
        proc = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0 and "GPU" in proc.stdout


def torch_index_args(variant: str) -> List[str]:
    """pip's index options for the torch build: PyTorch's CPU wheels by default, CUDA on request."""
    custom = os.environ.get("VIREFSAM_TORCH_INDEX")
    if custom:
        return ["--index-url", custom, "--extra-index-url", PYPI]
    if variant == "cpu" and sys.platform != "darwin":  # macOS wheels on PyPI are the CPU build already
        return ["--index-url", TORCH_CPU_INDEX, "--extra-index-url", PYPI]
    if variant == "cuda" and sys.platform.startswith("win"):
        return ["--index-url", TORCH_CUDA_INDEX, "--extra-index-url", PYPI]
    return []


def find_python() -> str:
    """The Python interpreter QGIS runs (inside QGIS ``sys.executable`` is often the QGIS program itself)."""
    want = f"{sys.version_info[0]}.{sys.version_info[1]}"
    candidates = []
    exe = Path(sys.executable or "")
    if exe.name.lower().startswith("python"):
        candidates.append(exe)
    base = Path(sys.exec_prefix)
    names = ["python.exe", "python3.exe"] if sys.platform.startswith("win") else [f"python{want}", "python3", "python"]
    for folder in (base, base / "bin"):
        candidates += [folder / n for n in names]
    candidates += [Path(p) for p in (shutil.which(f"python{want}"), shutil.which("python3")) if p]
    for c in candidates:
        if not c.is_file():
            continue
        try:
            proc = subprocess.run([str(c), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                  capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        if proc.returncode == 0 and proc.stdout.strip() == want:
            return str(c)
    raise InstallError(f"The Python {want} interpreter that QGIS uses was not found next to QGIS "
                       f"({sys.exec_prefix}): the dependencies cannot be installed from inside QGIS.")


def make_plan(settings_dir: str, variant: Optional[str] = None, missing_modules: Sequence[str] = ()) -> Plan:
    """The engine's plan: requirements.txt (+ missing engine modules QGIS lacks, e.g. rasterio) into the profile."""
    from .deps import PIP_NAME

    variant = variant or ("cuda" if nvidia_driver() else "cpu")
    versions = qgis_versions()
    reqs = read_requirements()
    names = {canonical(_NAME.match(r).group(1)) for r in reqs if _NAME.match(r)}
    for module in missing_modules:
        pip_name = PIP_NAME.get(module, module)
        if canonical(_NAME.match(pip_name).group(1)) not in names:
            reqs.append(pip_name)
    return Plan(
        folder=deps_folder.deps_dir(settings_dir),
        requirements=requirements_without(reqs, list(versions)),
        constraints=constraints_for(versions),
        variant=variant,
        index_args=torch_index_args(variant),
        needed_bytes=NEEDED_BYTES.get(variant, NEEDED_BYTES["cpu"]),
    )


# -- checks before starting --------------------------------------------------------------------------------------
def check_disk(plan: Plan) -> None:
    where = plan.folder.parent
    where.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(where).free
    if free < plan.needed_bytes:
        raise InstallError(f"The dependencies need about {plan.needed_bytes / 1e9:.1f} GB free in {where}, which has "
                           f"{free / 1e9:.1f} GB: free some disk space and try again.")


def index_urls(plan: Plan) -> List[str]:
    urls = [a for i, a in enumerate(plan.index_args) if i > 0 and plan.index_args[i - 1] in ("--index-url",
                                                                                                 "--extra-index-url")]
    return urls or [os.environ.get("PIP_INDEX_URL", PYPI)]


def check_network(plan: Plan, timeout: float = 15) -> None:
    for url in index_urls(plan):
        probe = url.rstrip("/") + "/pip/"
        try:
            with urllib.request.urlopen(urllib.request.Request(probe, method="HEAD"), timeout=timeout):
                pass
        except urllib.error.HTTPError:
            pass  # the server answered: the network is there
        except (urllib.error.URLError, OSError) as exc:
            host = urllib.parse.urlsplit(url).netloc or url
            reason = getattr(exc, "reason", exc)
            raise InstallError(f"The package index {host} cannot be reached ({reason}): check the network "
                               "connection (or the proxy) and try again.") from None


def pypi_fallback(plan: Plan) -> None:
    """PyTorch's CPU index unreachable (a firewall that lets PyPI through): take torch from PyPI instead (on
    Linux that is the larger CUDA build, which runs on the CPU too; the disk needed grows accordingly)."""
    if TORCH_CPU_INDEX not in plan.index_args:
        return
    try:
        check_network(Plan(folder=plan.folder, requirements=[], constraints=[],
                           index_args=["--index-url", TORCH_CPU_INDEX]), timeout=10)
    except InstallError:
        plan.index_args = []
        if sys.platform.startswith("linux"):
            plan.variant = "cuda"
            plan.needed_bytes = max(plan.needed_bytes, NEEDED_BYTES["cuda"])


def check_pip(python: str) -> None:
    proc = subprocess.run([python, "-m", "pip", "--version"], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise InstallError(f"QGIS's Python ({python}) has no pip: install pip for it (python -m ensurepip), then "
                           "click Install dependencies again.")


# -- progress from pip's output ----------------------------------------------------------------------------------
class PipProgress:
    """Turns pip's output lines into ``(fraction, message)``; the fraction never goes back."""

    def __init__(self, expected_packages: int = 40) -> None:
        self.expected = max(1, expected_packages)
        self.collected = 0
        self.fraction = 0.0

    def feed(self, line: str) -> Optional[tuple]:
        line = line.strip()
        if line.startswith("Collecting "):
            self.collected += 1
            f = 0.05 + 0.65 * min(1.0, self.collected / self.expected)
            msg = "Collecting " + line.split()[1]
        elif line.startswith("Downloading "):
            f, msg = self.fraction, line[:120]
        elif line.startswith("Installing collected packages"):
            f, msg = 0.75, "Installing the downloaded packages"
        elif line.startswith("Successfully installed"):
            f, msg = 0.9, "Installed; checking"
        else:
            return None
        self.fraction = max(self.fraction, f)
        return self.fraction, msg


def last_lines(path: Path, n: int = 3) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    return " / ".join((errors or lines)[-n:])[:600]


NETWORK_SIGNS = ("NewConnectionError", "Temporary failure in name resolution", "Failed to establish a new connection",
                 "Network is unreachable", "getaddrinfo failed", "ConnectTimeoutError", "Read timed out")


# -- the install ---------------------------------------------------------------------------------------------------
def remove(folder: Path) -> None:
    """Take the folder away (marker first, so a folder that cannot be removed completely is never used)."""
    folder = Path(folder)
    if not folder.exists():
        return
    deps_folder.remove_marker(folder)
    try:
        shutil.rmtree(folder)
    except OSError as exc:
        raise InstallError(f"{folder} could not be removed completely ({exc.strerror or exc}): restart QGIS and try "
                           "again.") from None
    if str(folder) in sys.path:
        sys.path.remove(str(folder))


def _kill(proc: subprocess.Popen) -> None:
    try:
        if os.name == "posix":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except (OSError, ProcessLookupError):
        pass


def run_pip(plan: Plan, progress: Progress = None, is_cancelled: Cancelled = None) -> None:
    """pip install --target, output to the log; raises InstallCancelled / InstallError."""
    plan.constraints_path.write_text("".join(c + "\n" for c in plan.constraints), encoding="utf-8")
    cmd = [plan.python, "-m", "pip", "install", "--target", str(plan.folder), "--constraint",
           str(plan.constraints_path), "--prefer-binary", "--no-cache-dir", "--disable-pip-version-check",
           "--no-input", "--progress-bar", "off", *plan.index_args, *plan.requirements]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONNOUSERSITE="1", PIP_NO_INPUT="1")
    env.pop("PYTHONPATH", None)
    meter = PipProgress(expected_packages=8 if plan.variant == "none" else 40)
    lines: "queue.Queue[Optional[str]]" = queue.Queue()
    with open(plan.log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                encoding="utf-8", errors="replace", start_new_session=(os.name == "posix"))

        def pump() -> None:
            for ln in proc.stdout:  # type: ignore[union-attr]
                lines.put(ln)
            lines.put(None)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        done = False
        while not done:
            if is_cancelled is not None and is_cancelled():
                _kill(proc)
                proc.wait()
                reader.join(timeout=10)
                proc.stdout.close()  # type: ignore[union-attr]
                log.write("\n-- cancelled: pip was stopped --\n")
                raise InstallCancelled("The install was cancelled; the half-finished folder is not used: click "
                                       "Repair / reinstall to install again.")
            try:
                ln = lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if ln is None:
                done = True
                continue
            log.write(ln)
            log.flush()
            step = meter.feed(ln)
            if step is not None and progress is not None:
                progress(*step)
        code = proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        log.write(f"\n-- pip exit code {code} --\n")
    if code != 0:
        text = plan.log_path.read_text(encoding="utf-8", errors="replace")
        if any(sign in text for sign in NETWORK_SIGNS):
            raise InstallError("pip lost the connection to the package index: check the network connection (or the "
                               f"proxy) and click Repair / reinstall (log: {plan.log_path}).")
        if "No space left on device" in text:
            raise InstallError(f"The disk filled up while installing (about {plan.needed_bytes / 1e9:.1f} GB are "
                               f"needed): free some space and click Repair / reinstall (log: {plan.log_path}).")
        raise InstallError(f"pip could not install the dependencies ({last_lines(plan.log_path)}); the full log is "
                           f"{plan.log_path}.")


def prune_provided(folder: Path, provided: Sequence[str]) -> List[str]:
    """Remove from ``folder`` the distributions QGIS provides (pip installed them at QGIS's version)."""
    want = {canonical(p) for p in provided}
    removed = []
    for info in sorted(Path(folder).glob("*.dist-info")):
        name = canonical(info.name[: -len(".dist-info")].rsplit("-", 1)[0])
        if name not in want:
            continue
        record = info / "RECORD"
        tops = set()
        if record.is_file():
            for row in record.read_text(encoding="utf-8", errors="replace").splitlines():
                rel = row.split(",", 1)[0]
                if not rel or rel.startswith(("..", "/")):
                    continue
                p = Path(folder) / rel
                tops.add(Path(rel).parts[0])
                if p.is_file() or p.is_symlink():
                    p.unlink()
        for top in tops:
            p = Path(folder) / top
            if p.is_dir() and not any(f.is_file() for f in p.rglob("*")):
                shutil.rmtree(p, ignore_errors=True)
        shutil.rmtree(info, ignore_errors=True)
        removed.append(name)
    return removed


STARTUP_CHECK = r"""
import json, sys
sys.path.insert(0, sys.argv[1])   # what deps_folder.activate does at plugin start
import importlib
out = {}
for m in sys.argv[2:]:
    mod = importlib.import_module(m)
    out[m] = getattr(mod, "__file__", None)
print("RESULT" + json.dumps(out))
"""


def check_imports(plan: Plan) -> Dict[str, str]:
    """A fresh Python with the folder first on sys.path imports the modules; numpy must stay QGIS's."""
    env = dict(os.environ, PYTHONNOUSERSITE="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([plan.python, "-c", STARTUP_CHECK, str(plan.folder), *plan.check_modules],
                          capture_output=True, text=True, timeout=600, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    if proc.returncode != 0 or not lines:
        detail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] or [f"exit {proc.returncode}"]
        raise InstallError(f"The installed packages do not import ({detail[0][:300]}); click Repair / reinstall "
                           f"(log: {plan.log_path}).")
    files = json.loads(lines[-1][len("RESULT"):])
    numpy_here = importlib.util.find_spec("numpy")
    if "numpy" in files and numpy_here is not None and files["numpy"]:
        if Path(files["numpy"]).resolve().is_relative_to(plan.folder.resolve()):
            raise InstallError("The install brought its own numpy, which would replace QGIS's: click Repair / "
                               f"reinstall (log: {plan.log_path}).")
    return files


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file() and not f.is_symlink())


def install(plan: Plan, progress: Progress = None, is_cancelled: Cancelled = None) -> dict:
    """The whole install (see the module's docstring). Returns the marker's content."""
    started = time.monotonic()
    say = progress or (lambda f, m: None)
    plan.python = plan.python or find_python()
    say(0.0, "Checking pip, the network and the disk")
    check_pip(plan.python)
    pypi_fallback(plan)
    check_network(plan)
    check_disk(plan)
    remove(plan.folder)  # a repair starts clean
    plan.folder.mkdir(parents=True)
    run_pip(plan, progress, is_cancelled)
    provided = [c.split("==")[0] for c in plan.constraints] + [t for t in BUILD_TOOLS if importlib.util.find_spec(t)]
    pruned = prune_provided(plan.folder, provided)
    say(0.95, "Checking that the packages import")
    files = check_imports(plan)
    info = {
        "variant": plan.variant,
        "requirements": plan.requirements,
        "constraints": plan.constraints,
        "pruned": pruned,
        "modules": files,
        "bytes": folder_size(plan.folder),
        "seconds": round(time.monotonic() - started, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    deps_folder.write_marker(plan.folder, info)
    say(1.0, "Dependencies installed")
    return info
