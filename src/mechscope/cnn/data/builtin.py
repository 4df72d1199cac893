"""The built-in IDX datasets: where their files live, their published checksums, and downloading.

Checksums, and where each comes from:

* ``mnist``, ``fashion-mnist``, ``kmnist``: the MD5s of torchvision's ``datasets/mnist.py``
  (``MNIST.resources``, ``FashionMNIST.resources``, ``KMNIST.resources``); MNIST's are also the
  ones in ../shared/data/README.md. Class names: Fashion-MNIST's from Zalando's README (as in
  torchvision), Kuzushiji-MNIST's romanised as in torchvision.
* ``emnist-digits``, ``emnist-letters``, ``emnist-balanced``
  (``emnist-{split}-{train,test}-{images-idx3,labels-idx1}-ubyte.gz``): the per-file MD5s of
  deeplearning4j's ``EmnistFetcher.java`` and of the ``mnists`` package (pczarnik/mnists,
  ``_emnist.py``), two independent lists that agree. NIST publishes the files only inside
  ``gzip.zip``; its MD5 is torchvision's ``EMNIST.md5``. Downloading fetches that zip (about
  560 MB), checks it, and takes the four files out (each checked again).

EMNIST stores each image transposed (column-major) relative to MNIST; loading transposes it
back so that characters stand upright. EMNIST letters' labels run 1-26 (0 is unused); they are
shifted to 0-25. The balanced split's 47 classes follow its mapping file: digits, capitals, and
the lower-case letters that differ from their capitals (a b d e f g h n q r t).

Where the files are looked for (first match wins): ``--data-dir`` / the ``data_dir`` argument,
``$MECHSCOPE_DATA``, ``~/.cache/mechscope/data``; inside it, the dataset's folder
(``mnist/``, ``fashion-mnist/``, ``kmnist/``, ``emnist/``) or the directory itself. Missing files
are downloaded (``$MECHSCOPE_MIRROR``, or ``$MECHSCOPE_MNIST_MIRROR`` for MNIST, or the
``mirror`` argument replaces the default mirrors), each verified before it is moved into place.
"""

from __future__ import annotations

import logging
import os
import shutil
import string
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from mechscope.cnn.data.idx import IMAGES, LABELS, IdxFile, md5sum
from mechscope.core.errors import DataError
from mechscope.core.paths import resolve_data_dir  # noqa: F401  (the data root; re-exported)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Archive:
    """A zip that holds the files under ``prefix``, with its published MD5."""

    url: str
    md5: str
    prefix: str


@dataclass(frozen=True)
class Builtin:
    name: str
    title: str
    folder: str
    files: dict[str, IdxFile]  # train_images, train_labels, test_images, test_labels
    mirrors: tuple[str, ...]
    class_names: tuple[str, ...]
    transposed: bool = False
    label_offset: int = 0
    archive: Archive | None = None
    mirror_env: str = "MECHSCOPE_MIRROR"

    @property
    def file_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.files.values())


def _idx4(prefix: str, n_train: int, n_test: int, md5s: tuple[str, str, str, str], test: str = "t10k"):
    names = (f"{prefix}train-images-idx3-ubyte.gz", f"{prefix}train-labels-idx1-ubyte.gz",
             f"{prefix}{test}-images-idx3-ubyte.gz", f"{prefix}{test}-labels-idx1-ubyte.gz")  # fmt: skip
    shapes = ((n_train, 28, 28), (n_train,), (n_test, 28, 28), (n_test,))
    keys = ("train_images", "train_labels", "test_images", "test_labels")
    magics = (IMAGES, LABELS, IMAGES, LABELS)
    return {k: IdxFile(n, m, g, s) for k, n, m, g, s in zip(keys, names, md5s, magics, shapes, strict=True)}


DIGITS = tuple(string.digits)
EMNIST_ZIP = Archive(
    "https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip", "58c8d27c78d21e728a6bc7b3cc06412e", "gzip/"
)
MD5 = {  # train images, train labels, test images, test labels (sources in the module docstring)
    "mnist": ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
              "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"),
    "fashion-mnist": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                      "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"),
    "kmnist": ("bdb82020997e1d708af4cf47b453dcf7", "e144d726b3acfaa3e44228e80efcd344",
               "5c965bf0a639b31b8f53240b1b52f4d7", "7320c461ea6c1c855c0b718fb2a4b134"),
    "emnist-digits": ("d2662ecdc47895a6bbfce25de9e9a677", "2223fcfee618ac9c89ef20b6e48bcf9e",
                      "a159b8b3bd6ab4ed4793c1cb71a2f5cc", "8afde66ea51d865689083ba6bb779fac"),
    "emnist-letters": ("8795078f199c478165fe18db82625747", "c16de4f1848ddcdddd39ab65d2a7be52",
                       "382093a19703f68edac6d01b8dfdfcad", "d4108920cd86601ec7689a97f2de7f59"),
    "emnist-balanced": ("4041b0d6f15785d3fa35263901b5496b", "7a35cc7b2b7ee7671eddf028570fbd20",
                        "6818d20fe2ce1880476f747bbc80b22b", "acd3694070dcbf620e36670519d4b32f"),
}  # fmt: skip
FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
KMNIST = ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")
BALANCED = tuple(string.digits + string.ascii_uppercase + "abdefghnqrt")


def _emnist(split: str, n_train: int, n_test: int, names: tuple[str, ...], offset: int = 0) -> Builtin:
    files = _idx4(f"emnist-{split}-", n_train, n_test, MD5[f"emnist-{split}"], test="test")
    return Builtin(f"emnist-{split}", f"EMNIST {split.capitalize()}", "emnist", files, (), names,
                   transposed=True, label_offset=offset, archive=EMNIST_ZIP)  # fmt: skip


BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in (
        Builtin("mnist", "MNIST", "mnist", _idx4("", 60000, 10000, MD5["mnist"]),
                ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"),
                DIGITS, mirror_env="MECHSCOPE_MNIST_MIRROR"),
        Builtin("fashion-mnist", "Fashion-MNIST", "fashion-mnist", _idx4("", 60000, 10000, MD5["fashion-mnist"]),
                ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",), FASHION),
        Builtin("kmnist", "Kuzushiji-MNIST", "kmnist", _idx4("", 60000, 10000, MD5["kmnist"]),
                ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",), KMNIST),
        _emnist("digits", 240000, 40000, DIGITS),
        _emnist("letters", 124800, 20800, tuple(string.ascii_lowercase), offset=1),
        _emnist("balanced", 112800, 18800, BALANCED),
    )
}  # fmt: skip


def dataset_dir(root: Path, ds: Builtin) -> Path:
    """Where a dataset's files are (or will be downloaded to) under the data root."""
    if root.is_dir() and any((root / n).exists() for n in ds.file_names) and not (root / ds.folder).is_dir():
        return root
    return root / ds.folder


def check_dir(directory: Path, what: str) -> None:
    if directory.exists() and not directory.is_dir():
        raise DataError(f"{directory}: not a directory; expected the {what} data directory")
    if directory.is_dir():
        try:
            os.listdir(directory)
        except PermissionError:
            raise DataError(f"{directory}: directory is not readable") from None


Failures = list[tuple[str, str]]  # (address, what went wrong) of each failed try


def _fetch(url: str, dest: Path, timeout: float) -> None:
    with open(dest, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
        shutil.copyfileobj(resp, out)


def download(ds: Builtin, directory: Path, names: tuple[str, ...], mirror: str | None = None, timeout=30.0) -> None:
    """Download ``names`` of ``ds`` into ``directory``, each verified against its MD5 before it is moved in."""
    chosen = mirror or os.environ.get(ds.mirror_env) or os.environ.get("MECHSCOPE_MIRROR")
    mirrors = [m if m.endswith("/") else m + "/" for m in ([chosen] if chosen else list(ds.mirrors))]
    by_name = {f.name: f for f in ds.files.values()}
    made = [p for p in (directory, *directory.parents) if not p.exists()]  # deepest first
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {ds.title} directory {directory}: {e.strerror or e}") from None
    errors: Failures = []
    left = []
    for name in names:
        if not any(_try_file(base + name, directory, name, by_name[name].md5, errors, timeout) for base in mirrors):
            left.append(name)
    if left and ds.archive is not None and not chosen:
        left = _from_archive(ds, directory, left, errors, timeout)
    if left:
        _remove_empty(made)
        raise DataError(
            f"{ds.title} files missing from {directory} (expected {', '.join(ds.file_names)}) "
            f"and the download failed ({_failures(errors)}); put the four files there, "
            "or point --data-dir / MECHSCOPE_DATA at a directory that has them"
        )


def _remove_empty(made: list[Path]) -> None:
    """Take back the folders a failed download made (deepest first), where they are still empty."""
    for folder in made:
        try:
            folder.rmdir()
        except OSError:
            return


def _failures(errors: Failures) -> str:
    """What went wrong, each cause once: an offline machine's eight addresses are one cause, not eight."""
    by_cause: dict[str, list[str]] = {}
    for url, cause in errors:
        by_cause.setdefault(cause, []).append(url)
    every = "all " if len(by_cause) == 1 else ""  # "at all 4" beside "at all 5" of the 9 tried read wrong
    return "; ".join(f"{urls[0]}: {cause}" if len(urls) == 1 else f"{cause} at {every}{len(urls)} addresses, "
                     f"e.g. {urls[0]}" for cause, urls in by_cause.items()) or "no mirror"  # fmt: skip


def _try_file(url: str, directory: Path, name: str, md5: str, errors: Failures, timeout: float) -> bool:
    log.info("downloading %s", url)
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _fetch(url, tmp, timeout)
        got = md5sum(tmp)
        if got != md5:
            errors.append((url, f"MD5 {got}, expected {md5}"))
            return False
        tmp.replace(directory / name)
        return True
    except (urllib.error.URLError, OSError, ValueError) as e:
        errors.append((url, str(getattr(e, "reason", None) or e)))
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _from_archive(ds: Builtin, directory: Path, names: list[str], errors: Failures, timeout: float) -> list[str]:
    """Fetch the dataset's zip (verified), take ``names`` out of it (each verified); return those still missing."""
    arc = ds.archive
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=".archive.", suffix=".zip.part")
    os.close(fd)
    tmp = Path(tmp_name)
    left = list(names)
    try:
        log.info("downloading %s", arc.url)
        _fetch(arc.url, tmp, timeout)
        got = md5sum(tmp)
        if got != arc.md5:
            errors.append((arc.url, f"MD5 {got}, expected {arc.md5}"))
            return left
        by_name = {f.name: f for f in ds.files.values()}
        with zipfile.ZipFile(tmp) as z:
            for name in names:
                part = directory / f".{name}.part"
                try:
                    with z.open(arc.prefix + name) as src, open(part, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    if md5sum(part) != by_name[name].md5:
                        errors.append((arc.url, f"{name} inside has MD5 {md5sum(part)}, expected {by_name[name].md5}"))
                        continue
                    part.replace(directory / name)
                    left.remove(name)
                except KeyError:
                    errors.append((arc.url, f"no {arc.prefix + name} inside"))
                finally:
                    part.unlink(missing_ok=True)
    except (urllib.error.URLError, OSError, ValueError, zipfile.BadZipFile) as e:
        errors.append((arc.url, str(getattr(e, "reason", None) or e)))
    finally:
        tmp.unlink(missing_ok=True)
    return left
