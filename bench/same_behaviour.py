"""Behaviour unchanged, proven: run the same commands on two versions of mechscope and compare the outputs.

The "before" version is a git revision, checked out into a temporary worktree and run with the same Python
(its ``src`` first on ``PYTHONPATH``); the "after" version is this checkout. Each side runs, into its own folder:

* ``cnn train`` on the defaults (the weights must be bit-identical, tensor for tensor);
* ``cnn attribute`` (``faithfulness.json``) and ``cnn explain`` (``mechanisms.json``) on that run;
* ``lm heads --model smollm2`` (``heads.json``);
* ``lm circuits`` on ``../shared/data/gpt2-small-partial`` (``circuits.json``: the weights-only readings of a partial
  checkpoint, learned positions included) and on SmolLM2 (``circuits-smollm2/circuits.json``: with the induction
  circuit, the logit lens and the OV and QK token tables, which need a whole model).

Both sides run with ``MKL_CBWR=AUTO,STRICT`` (unless it is set already), as ``import mechscope`` now sets it. Without
it MKL's results change with the number of threads and, now and then, from one process to the next, so a revision
from before that setting would differ from itself in `lm heads`' fifth digit; in strict mode what is compared is
the arithmetic.

Then every JSON file is compared field by field, timings aside (``seconds``, ``*_seconds``, library versions and
paths; and ``work``, the passes each side made, which is printed instead): numbers must be equal (``--rtol`` 0 by
default), and so must every string, list and key.

    python bench/same_behaviour.py --before 4da175b [--work /tmp/same] [--only cnn|lm] [--rtol 0]

A side's outputs already in ``--work`` are reused, so a second call only compares; they are reused only when the same
code made them (``made-by.txt``: the before side's commit; this checkout's HEAD and a hash of its uncommitted diff), and
a ``tree-before`` already there must hold the commit asked for. Anything else is refused with the reason.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from benchlib import load

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
IGNORED = {"seconds", "train_seconds", "versions", "library_versions", "created", "path", "paths", "run", "out",
           "data_dir", "folder", "elapsed", "timing", "timings",
           "work"}  # fmt: skip  (the passes an analysis made: what removing passes changes; printed, not compared)


def commands(side: Path) -> dict[str, list[str]]:
    run = side / "mnist"
    return {
        "train": ["cnn", "train", "--out", str(run), "--force"],
        "attribute": ["cnn", "attribute", "--run", str(run), "--out", str(side / "attribution"), "--force"],
        "explain": ["cnn", "explain", "--run", str(run), "--out", str(side / "explain"), "--force"],
        "heads": ["lm", "heads", "--model", "smollm2", "--out", str(side / "heads"), "--force"],
        "circuits": ["lm", "circuits", "--model", str(SHARED / "gpt2-small-partial"), "--out",
                     str(side / "circuits"), "--force"],  # fmt: skip
        "circuits-smollm2": ["lm", "circuits", "--model", "smollm2", "--out", str(side / "circuits-smollm2"),
                             "--force"],  # fmt: skip
    }


OUTPUTS = {
    "train": ["mnist/metrics.json"],
    "attribute": ["attribution/faithfulness.json"],
    "explain": ["explain/mechanisms.json"],
    "heads": ["heads/heads.json"],
    "circuits": ["circuits/circuits.json"],
    "circuits-smollm2": ["circuits-smollm2/circuits.json"],
}
GROUPS = {"cnn": ("train", "attribute", "explain"), "lm": ("heads", "circuits", "circuits-smollm2")}


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True).stdout.strip()


def worktree(rev: str, where: Path) -> Path:
    """The checkout of ``rev`` at ``where``; one already there must hold that commit (an earlier call's)."""
    want = git("rev-parse", f"{rev}^{{commit}}")
    if not (where / "src" / "mechscope").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), want], check=True)
    elif (held := _head(where)) != want:
        raise SystemExit(f"{where} holds {held[:12] or 'no checkout'}, not {rev} ({want[:12]}): give another --work")
    return where / "src"


def _head(where: Path) -> str:
    done = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


def stamp(name: str, src: Path) -> str:
    """What a side's outputs were made by: the before side's commit; this checkout's HEAD, its uncommitted diff and
    its untracked source files (a new module the diff does not show)."""
    if name == "before":
        return _head(src.parent)
    h = hashlib.sha256(subprocess.run(["git", "-C", str(ROOT), "diff", "HEAD"], check=True, capture_output=True).stdout)
    for path in sorted(git("ls-files", "--others", "--exclude-standard", "--", "src").splitlines()):
        h.update(path.encode() + b"\0" + (ROOT / path).read_bytes())
    return f"{git('rev-parse', 'HEAD')} {h.hexdigest()[:16]}"


def check_stamp(name: str, src: Path, side: Path) -> None:
    """Outputs in ``side`` are reused only when they were made by the same code: refuse others in one line."""
    now, file = stamp(name, src), side / "made-by.txt"
    if file.is_file() and file.read_text().strip() != now:
        raise SystemExit(f"{side} holds outputs of other code ({file.read_text().strip()}; now {now}): give "
                         "another --work")  # fmt: skip
    if not file.is_file() and side.is_dir() and any(side.iterdir()):
        raise SystemExit(f"{side} holds outputs of unknown code: give another --work")
    side.mkdir(parents=True, exist_ok=True)
    file.write_text(now + "\n")


def run_side(src: Path, side: Path, steps: tuple[str, ...]) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(src))
    env.setdefault("MKL_CBWR", "AUTO,STRICT")  # as mechscope sets it: MKL's bits independent of threads and run
    if (SHARED / "mnist").is_dir():
        env.setdefault("MECHSCOPE_DATA", str(SHARED))
    side.mkdir(parents=True, exist_ok=True)
    times = {}
    for step in steps:
        if all((side / o).is_file() for o in OUTPUTS[step]):
            continue
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "mechscope", *commands(side)[step]]
        print(f"[{side.name}] {' '.join(cmd[2:])}", flush=True)
        subprocess.run(cmd, env=env, check=True, cwd=side)
        times[step] = time.perf_counter() - start
    return times


HEADERS = ("schema", "schema_version")  # the one schema header replaced the four markers: shown, not compared


def header(d: dict) -> str:
    return ", ".join(f"{k}={d[k]!r}" for k in HEADERS if k in d) or "none"


def differences(a, b, where: str = "", rtol: float = 0.0, top: bool = True) -> list[str]:
    """Every place where two JSON values differ (ignored keys and top-level schema headers aside)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k in IGNORED or k.endswith("_seconds") or (top and k in HEADERS):
                continue
            if k not in a or k not in b:
                out.append(f"{where}.{k}: only in {'after' if k not in a else 'before'}")
                continue
            out += differences(a[k], b[k], f"{where}.{k}", rtol, False)
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} != {len(b)}"]
        out = []
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            out += differences(x, y, f"{where}[{i}]", rtol, False)
        return out
    if isinstance(a, bool) != isinstance(b, bool):  # true and 1 are equal in Python, not in a JSON file
        return [f"{where}: {a!r} != {b!r}"]
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        if a == b or (math.isnan(a) and math.isnan(b)):
            return []
        if rtol and math.isclose(a, b, rel_tol=rtol, abs_tol=0.0):
            return []
        return [f"{where}: {a!r} != {b!r}"]
    return [] if a == b else [f"{where}: {str(a)[:80]!r} != {str(b)[:80]!r}"]


def passes(a: dict, b: dict) -> str:
    """The work each side counted (forward passes + 2 x backward passes), when both JSON files have it."""
    if not (isinstance(a.get("work"), dict) and isinstance(b.get("work"), dict)):
        return ""
    n = [w["forward_passes"] + 2 * w["backward_passes"] for w in (a["work"], b["work"])]
    return f"; passes {n[0]:.1f} -> {n[1]:.1f}"


def same_weights(a: Path, b: Path) -> list[str]:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    if set(x) != set(y):
        return [f"model.safetensors: tensors {sorted(set(x) ^ set(y))} differ"]
    return [f"model.safetensors: {k} differs" for k in sorted(x) if not (x[k].dtype == y[k].dtype and
            x[k].shape == y[k].shape and bool((x[k] == y[k]).all()))]  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="git revision of the version to compare against")
    p.add_argument("--work", default="/tmp/mechscope-same", help="where both sides write (reused)")
    p.add_argument("--only", choices=sorted(GROUPS), help="only the CNN or only the LM commands")
    p.add_argument("--rtol", type=float, default=0.0, help="relative tolerance for numbers (default: equal)")
    p.add_argument("--side", choices=("before", "after"), help="only run one side, compare nothing")
    args = p.parse_args()
    work = Path(args.work).absolute()
    steps = GROUPS[args.only] if args.only else tuple(OUTPUTS)
    sides = {"before": worktree(args.before, work / "tree-before"), "after": ROOT / "src"}
    print(f"{load()} at the start", flush=True)
    for name, src in sides.items():
        if args.side in (None, name):
            check_stamp(name, src, work / name)
            times = run_side(src, work / name, steps)
            if times:
                print(f"[{name}] " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    print(f"{load()} at the end", flush=True)
    if args.side:
        return 0
    problems = []
    if "train" in steps:
        problems += same_weights(work / "before/mnist/model.safetensors", work / "after/mnist/model.safetensors")
        print(f"model.safetensors: {'bit-identical' if not problems else 'DIFFERENT'}")
    for step in steps:
        for rel in OUTPUTS[step]:
            a = json.loads((work / "before" / rel).read_text())
            b = json.loads((work / "after" / rel).read_text())
            found = differences(a, b, rel, args.rtol)
            print(f"{rel}: " + ("equal field by field (timings aside)" if not found else f"{len(found)} differences")
                  + f"; header {header(a)} -> {header(b)}" + passes(a, b))
            problems += found
    for line in problems[:40]:
        print("  " + line)
    print("SAME (every field equal, timings aside; the schema headers are shown above)" if not problems
          else f"DIFFERENT: {len(problems)} differences")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
