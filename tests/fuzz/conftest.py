"""Hypothesis profiles for the fuzz tests and the pristine inputs they corrupt.

Profiles (``HYPOTHESIS_PROFILE``): ``fast`` (the default, ``make test``: a few dozen examples per
format, the whole directory in well under a minute), ``campaign`` (``make test-fuzz``: 10,000
examples per format through the loaders; ``FUZZ_EXAMPLES`` changes the count). Examples of the
command line run in-process, a fraction of the loaders' count (``cli_examples``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.fuzz import builders as B

_COMMON = dict(deadline=None, derandomize=False, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])  # fmt: skip
CAMPAIGN = int(os.environ.get("FUZZ_EXAMPLES", "10000"))
settings.register_profile("fast", max_examples=30, database=None, **_COMMON)
settings.register_profile("campaign", max_examples=CAMPAIGN, database=None, **_COMMON)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "fast")
settings.load_profile(PROFILE if PROFILE in ("fast", "campaign") else "fast")


def cli_examples() -> int:
    """Examples of each command-line fuzz test: 10 in the fast tier, a tenth of the campaign's."""
    return 10 if PROFILE != "campaign" else max(10, CAMPAIGN // 10)


@pytest.fixture(scope="session")
def pristine(tmp_path_factory) -> dict[str, Path]:
    """One valid input of every format (never modified: each example corrupts a copy)."""
    root = tmp_path_factory.mktemp("pristine")
    npz = B.write_npz(root / "data.npz")
    out = {
        "npz": npz,
        "idx": B.write_idx_folder(root / "idx", gz=False),
        "idx_gz": B.write_idx_folder(root / "idx_gz", gz=True),
        "class_names": B.write_class_names(root / "classes.txt"),
        "run": B.write_run(root / "run", npz),
        "hf": B.write_hf_dir(root / "hf"),
        "hf_json": B.write_hf_dir(root / "hf_json", tokenizer="json"),
        "hf_shards": B.write_hf_dir(root / "hf_shards", shards=2),
        "gguf": B.write_gguf(root / "tiny.gguf"),
        "text": B.write_text(root / "text.txt"),
    }
    return out


def copy_input(src: Path, dest_dir: Path) -> Path:
    dest = dest_dir / src.name
    if src.is_dir():
        shutil.copytree(src, dest)
    else:
        shutil.copy(src, dest)
    return dest
