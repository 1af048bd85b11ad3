"""``data fetch``: put the four MNIST files in place and check them.

Files already present are verified by the MD5 of their (decompressed)
content and kept.  Missing or corrupt ones are fetched with torchvision when
it is installed, otherwise over HTTPS from the mirrors torchvision uses,
checking the MD5 of every downloaded ``.gz`` before it is moved into place.
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from fl.data import DATA_ENV, MNIST_FILES, DataError, MnistFile, content_md5, find_file, raw_dir
from node.durable import open_durably

MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://yann.lecun.com/exdb/mnist/",
)
TIMEOUT_SECONDS = 30


def _verified(root: Path, spec: MnistFile) -> bool:
    path = find_file(root, spec.name)
    if path is None:
        return False
    try:
        return content_md5(path) == spec.raw_md5
    except DataError:
        return False


def _download(url: str, dest: Path, *, expected_md5: str) -> None:
    digest = hashlib.md5()
    with (
        open_durably(dest, mode=0o644) as out,
        urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as resp,
    ):
        while chunk := resp.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
        if digest.hexdigest() != expected_md5:
            raise DataError(f"{url}: MD5 {digest.hexdigest()} does not match {expected_md5}")


def _fetch_with_torchvision(root: Path) -> bool:
    try:
        from torchvision.datasets import MNIST  # type: ignore[import-not-found]
    except ImportError:
        return False
    try:
        MNIST(str(root), train=True, download=True)
        MNIST(str(root), train=False, download=True)
    except Exception:  # torchvision raises plain RuntimeError/URLError offline
        return False
    return True


def fetch_mnist(root: Path, *, log: Callable[[str], None] = print) -> None:
    """Make sure ``root/MNIST/raw`` holds four verified files; raise DataError if not."""
    missing = [spec for spec in MNIST_FILES if not _verified(root, spec)]
    if not missing:
        log(f"MNIST files in {raw_dir(root)} are present and verified.")
        return
    raw_dir(root).mkdir(parents=True, exist_ok=True)
    if _fetch_with_torchvision(root):
        missing = [spec for spec in missing if not _verified(root, spec)]
    errors: list[str] = []
    for spec in missing:
        dest = raw_dir(root) / f"{spec.name}.gz"
        for mirror in MIRRORS:
            url = f"{mirror}{spec.name}.gz"
            log(f"downloading {url}")
            try:
                _download(url, dest, expected_md5=spec.gz_md5)
                break
            except (urllib.error.URLError, OSError, DataError) as exc:
                errors.append(f"{url}: {getattr(exc, 'reason', exc)}")
        if not _verified(root, spec):
            raise DataError(
                f"could not fetch {spec.name}.gz from any mirror ({'; '.join(errors)}). "
                f"If this machine is offline, copy the four MNIST files into {raw_dir(root)} "
                f"or point --data-dir / ${DATA_ENV} at a folder that holds MNIST/raw/."
            )
    log(f"MNIST files in {raw_dir(root)} are present and verified.")
