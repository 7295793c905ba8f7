"""Where the engine keeps files that are not in git (converted weights, downloaded packages)."""

import os
import sys
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
RESOURCES = PACKAGE_ROOT / "resources"


def cache_dir() -> Path:
    """The model cache: ``$VIREFSAM_HOME`` if set, else the platform's per-user cache folder."""
    env = os.environ.get("VIREFSAM_HOME")
    if env:
        base = Path(env)
    elif sys.platform.startswith("win"):
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "virefsam"
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches" / "virefsam"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "virefsam"
    base.mkdir(parents=True, exist_ok=True)
    return base
