"""Run directories: what a training run writes, and loading it back.

A run directory holds ``model.safetensors`` (the weights), ``config.json`` (its layout,
``mechscope.cnn_run/1``; architecture, training settings, seed, the dataset with its checksums, shape and class
names, library versions) and ``metrics.json`` (test accuracy, per-class accuracy, confusion matrix, training
seconds, parameter count). Runs written before the CNN took other shapes and data (kind
``mnist-cnn``, ``conv1_channels``/``conv2_channels``, MNIST only) and runs without the layout header load as
they are; a run of a newer layout (written by a newer mechscope) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from mechscope.cnn.models.cnn import CNN, CNNConfig
from mechscope.core.errors import MechscopeError, RunError
from mechscope.core.outputs import WEIGHTS_KEY, check_target, same_weights, save_tensors, weights_hash, write_json  # noqa: F401  (used here; re-exported)
from mechscope.core.paths import dictionary_note, other_wing
from mechscope.core.results import check_schema
from mechscope.core.validate import field as check_field
from mechscope.core.validate import read_json_object, shown, usable_path

KIND = "cnn"
SCHEMA = "mechscope.cnn_run/1"  # config.json's layout; runs written before it carry none and load as version 1
KINDS = (KIND, "mnist-cnn")  # mnist-cnn: runs written before the CNN half took other data
WEIGHTS, CONFIG, METRICS = "model.safetensors", "config.json", "metrics.json"


def check_out_dir(path: str | Path, force: bool = False) -> Path:
    """Raise unless ``path`` can be written: absent, empty, or ``force`` given (:func:`check_target`'s checks);
    ``path`` as given."""
    check_target(path, force)
    return Path(path)


def prepare_out_dir(path: str | Path, force: bool = False) -> Path:
    """Create an output directory; refuse one that exists and is not empty unless ``force``.

    With ``force`` the files a command writes replace their old versions; nothing else in the
    directory is deleted (``--out ~ --force`` must never empty a home directory).
    """
    out = check_out_dir(path, force)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create {out}: {e.strerror or e}") from None
    return out


def save_run(out: Path, model: CNN, config: dict, metrics: dict) -> None:
    """Write a run directory into ``out`` (an existing directory, e.g. from :func:`outputs.atomic_output`);
    ``config["data"]``: the dataset the model was trained on (``ImageData.describe()``), which loading reads."""
    if not isinstance(config.get("data"), dict) or not config["data"].get("name"):
        raise MechscopeError("save_run: config['data'] must name the dataset the model was trained on "
                             "(ImageData.describe(), or {'name': 'mnist', 'kind': 'builtin'})")  # fmt: skip
    save_tensors(out / WEIGHTS, model.state_dict(), metadata={"kind": KIND})
    record = {"schema": SCHEMA, "kind": KIND, "model": model.config.to_dict(), **config}
    write_json(out / CONFIG, record | {WEIGHTS_KEY: weights_hash(model)})  # write_json adds the versions
    write_json(out / METRICS, metrics)


@dataclass
class Run:
    path: Path
    model: CNN
    config: dict
    metrics: dict
    weights_sha256: str = field(default="")  # weights_hash(model), computed once at load

    @property
    def data(self) -> dict:
        """The dataset the run was trained on, as config.json records it (runs of kind mnist-cnn: MNIST)."""
        recorded = dict(self.config.get("data") or {})
        recorded.setdefault("name", "mnist")
        recorded.setdefault("kind", "builtin")
        return recorded

    @property
    def class_names(self) -> tuple[str, ...]:
        names = self.data.get("class_names")
        return tuple(names) if names else tuple(str(i) for i in range(self.model.config.n_classes))


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise RunError(f"{path.parent}: not a mechscope run directory ({path.name} is missing)")
    return read_json_object(path, f"run's {path.name}", RunError)


NORM_MAX = 1000  # the largest |mean| and std a run's normalisation may hold (pixels are in [0, 1])
MAX_SIZE = 4096  # widths, image sizes, classes beyond this in a run's config: a corrupt file


def check_run_config(config: dict, where: Path) -> dict:
    """The run config's fields that loading uses, checked one by one; returns the model fields."""
    if "schema" in config:  # a run written by a newer mechscope is refused, not read by this one's rules
        check_schema(check_field(config, "schema", "str", where, error=RunError), SCHEMA, str(where))
    check_field(config, "kind", "str", where, choices=KINDS, error=RunError)
    model = check_field(config, "model", "object", where, error=RunError)
    f = f"{where} model"

    def get(key, kind, **kw):  # absent: the default; present: of its type (null is not a value here)
        return check_field(model, key, kind, f, error=RunError, label=f"model.{key}", **kw) if key in model else None

    for key in ("in_channels",):
        get(key, "int", lo=1, hi=MAX_SIZE)
    get("image_size", "int", lo=1, hi=MAX_SIZE)
    channels = get("channels", "ints", lo=1, hi=MAX_SIZE)
    if channels is not None and not 1 <= len(channels) <= 4:
        raise RunError(f"{where}: field 'model.channels' holds {len(channels)} widths; expected 1 to 4")
    for key in ("conv1_channels", "conv2_channels"):  # runs from before the shape options
        get(key, "int", lo=1, hi=MAX_SIZE)
    get("kernel_size", "int", lo=1, hi=MAX_SIZE)
    get("padding", "int", lo=0, hi=MAX_SIZE)
    get("pool", "int", lo=1, hi=MAX_SIZE)
    get("batchnorm", "bool")
    get("activation", "str")
    check_field(model, "hidden", "int", f, error=RunError, nullable=True, default=None, label="model.hidden",
                lo=1, hi=1 << 20)  # fmt: skip
    get("n_classes", "int", lo=2, hi=1 << 20)
    for key in ("mean", "std"):  # pixels are scaled to [0, 1]: a mean or std past 1,000 makes NaN logits
        value = get(key, "numbers")
        values = value if isinstance(value, list) else [] if value is None else [value]
        if key == "std" and 0 in values:
            raise RunError(f"{where}: field 'model.std' is 0; expected a nonzero standard deviation")
        lo = 0 if key == "std" else -NORM_MAX
        if any(not lo <= v <= NORM_MAX for v in values):
            want = f"above 0 and at most {NORM_MAX:,}" if key == "std" else f"from -{NORM_MAX:,} to {NORM_MAX:,}"
            raise RunError(f"{where}: field 'model.{key}' is {shown(value)}; expected a finite number (or one per "
                           f"channel) {want}: the {key} of pixels scaled to [0, 1]")  # fmt: skip
    if config["kind"] == KIND and not config.get("data"):  # read as MNIST, a run of other data was scored on MNIST
        raise RunError(f"{where}: field 'data' is missing; a {KIND} run records the dataset it was trained on "
                       "(only runs of kind mnist-cnn, from before other data, go without it)")  # fmt: skip
    data = check_field(config, "data", "object", where, error=RunError, default={}, nullable=True) or {}
    for key in ("name", "kind", "directory", "file"):
        if key in data:
            check_field(data, key, "str", where, error=RunError, label=f"data.{key}")
    names = check_field(data, "class_names", "list", where, error=RunError, label="data.class_names") if (
        "class_names" in data) else None  # fmt: skip
    if names is not None and not all(isinstance(n, str) for n in names):
        raise RunError(f"{where}: field 'data.class_names' is not a list of strings")
    return model


def load_run(path: str | Path) -> Run:
    """Load a trained CNN run: the model (in eval mode), its config and its metrics."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    usable_path(path, "run")  # a name the file system refuses (too long), or no path: one line, not an OSError
    run = Path(path)
    if not run.is_dir():
        raise RunError(f"{run}: {'is a file, not a run directory' if run.exists() else 'run directory not found'}")
    try:
        config = _read_json(run / CONFIG)
        if "kind" in config and config["kind"] not in KINDS:
            raise RunError(f"{run}: a run of kind {config.get('kind')!r}; expected {KIND!r}")
        fields = check_run_config(config, run / CONFIG)
    except RunError:
        elsewhere = other_wing(run, "cnn") or dictionary_note(run)  # read only when the run's config does not load
        if elsewhere:  # another wing's model: say which commands take it
            raise RunError(f"{run}: not a CNN run{elsewhere}") from None
        raise
    try:
        with torch.random.fork_rng(devices=[]):  # the initial weights are overwritten: leave the caller's RNG alone
            model = CNN(CNNConfig.from_dict(fields))
    except (TypeError, ValueError, MechscopeError) as e:
        raise RunError(f"{run / CONFIG}: invalid model config ({e})") from None
    weights = run / WEIGHTS
    if not weights.is_file():
        raise RunError(f"{run}: {WEIGHTS} is " + ("not a file" if weights.exists() else "missing"))
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise RunError(f"{weights}: corrupt or not a safetensors file ({e})") from None
    _check_state(weights, model.state_dict(), state)
    model.load_state_dict(state)
    model.eval()
    metrics = _read_json(run / METRICS) if (run / METRICS).exists() else {}
    digest = weights_hash(model)
    recorded = config.get(WEIGHTS_KEY)
    if isinstance(recorded, str) and recorded != digest:  # another run's weights read with this run's record
        raise RunError(f"{weights}: not the weights {CONFIG} records (sha256 {digest[:12]}, recorded "
                       f"{recorded[:12]}): the run's files come from different trainings")  # fmt: skip
    return Run(run, model, config, metrics, digest)


def _check_state(weights: Path, expected: dict, state: dict) -> None:
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or extra or wrong:
        detail = "; ".join(
            part
            for part in (
                f"missing {', '.join(missing)}" if missing else "",
                f"unexpected {', '.join(extra)}" if extra else "",
                ", ".join(f"{k} is {list(state[k].shape)}, expected {list(expected[k].shape)}" for k in wrong),
            )
            if part
        )
        raise RunError(f"{weights}: weights of another architecture ({detail})")
    for k in sorted(state):
        t = state[k]
        if t.is_floating_point() and not torch.isfinite(t).all():
            n = int((~torch.isfinite(t)).sum())
            kinds = "NaN" if torch.isnan(t).any() else "infinite values"
            raise RunError(
                f"{weights}: tensor {k} holds {n} non-finite value(s) ({kinds}); a diverged run or a corrupt file"
            )
        if t.dtype != expected[k].dtype:
            raise RunError(f"{weights}: tensor {k} is {str(t.dtype).removeprefix('torch.')}; "
                           f"expected {str(expected[k].dtype).removeprefix('torch.')}")  # fmt: skip


def load_run_data(run: Run, dataset: str | None = None, data_dir=None, class_names=None):
    """The run's dataset (or ``dataset`` when given), loaded as :func:`~mechscope.cnn.data.images.load_dataset` does.

    A built-in dataset is looked for under ``data_dir`` as always; a folder of IDX files or a .npz
    is taken from where the run recorded it unless ``data_dir`` / ``dataset`` says otherwise.
    """
    from mechscope.cnn.data.images import check_recorded, load_dataset
    from mechscope.core.errors import DataError

    recorded = run.data
    from_record = dataset is None
    if dataset is None:
        kind = recorded.get("kind")
        if kind == "idx":
            dataset, data_dir = "idx", data_dir or recorded.get("directory")
        elif kind == "npz":
            dataset = recorded.get("file")
        else:
            dataset = recorded.get("name", "mnist")
    names = class_names if class_names is not None else recorded.get("class_names")
    try:
        data = load_dataset(dataset, data_dir, names)
    except DataError as e:
        # say where the dataset's name came from (not when the user's own class names file is what failed)
        if from_record and class_names is None and str(run.path) not in str(e):
            raise DataError(f"{run.path / CONFIG}: the data it records: {e}") from None
        raise
    check_recorded(data, recorded)
    if data.shape != run.model.input_shape:
        raise RunError(
            f"{run.path}: the model takes images shaped {list(run.model.input_shape)}; "
            f"{data.name} has {list(data.shape)}"
        )
    if data.n_classes != run.model.config.n_classes:
        k = run.model.config.n_classes
        raise RunError(f"{run.path}: the model has {k} classes; {data.name} has {data.n_classes}")
    return data
