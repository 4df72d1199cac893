"""A folder of the user's images, read with PIL: every file must be an image PIL can read.

``read_folder(path)`` reads every file in the folder (not its sub-folders; hidden files are skipped) in name order.
A file that is not an image, or one PIL cannot decode, is a one-line error naming it: a folder that mixes images
with other files is refused rather than read in part, so that "the top images of the folder" means all of them.
``read_concepts(path)`` reads a folder of such folders, one per concept (its name is the concept's word).
"""

from __future__ import annotations

from pathlib import Path

from mechscope.core.errors import DataError

MAX_IMAGES = 20_000


def image_files(folder: Path) -> list[Path]:
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise DataError(f"{folder}: image folder not found")
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder (expected a folder of images)")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(f"{folder}: no image files in the folder")
    if len(files) > MAX_IMAGES:
        raise DataError(f"{folder}: {len(files):,} files; at most {MAX_IMAGES:,} images are read")
    return files


def open_image(path: Path):
    """A decoded PIL image (fully read); an unreadable or non-image file is a one-line error."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image PIL can read (expected PNG, JPEG, ...)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
        raise DataError(f"{path}: unreadable image ({reason})") from None


def read_folder(folder, preprocess) -> tuple:
    """Unit pixels [N,C,S,S] of every image in ``folder`` (``preprocess``: the model's
    :class:`~mechscope.clip.models.preprocess.Preprocessor`) and their file names."""
    files = image_files(Path(folder))
    images = [open_image(p) for p in files]
    return preprocess.to_unit(images), [p.name for p in files]


def read_concepts(folder, preprocess) -> dict:
    """``{concept: (unit pixels [n,C,S,S], file names)}`` from a folder holding one folder of pictures per concept."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder (expected one sub-folder of pictures per concept)")
    subs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(subs) < 2:
        raise DataError(f"{folder}: expected at least two concept folders (their names are the concepts' words), "
                        f"found {len(subs)}")  # fmt: skip
    return {p.name: read_folder(p, preprocess) for p in subs}
