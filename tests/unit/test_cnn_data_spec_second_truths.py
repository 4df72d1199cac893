"""Second outside truths for a user's own image data (cnn/data/images.py) and a user's own CNN (cnn/models/spec.py).

Data: arrays built with numpy, written with np.savez / the IDX writer and read back by hand (hashlib, plain
slicing); every refusal is checked just past its boundary, with distinct values so that swapped fields show.
Models: hand-built torch.nn stacks whose stages, shapes and parameter counts are worked out by hand, receptive
fields by the textbook recurrence (a plain loop) and by autograd through torch's own modules.
"""

from __future__ import annotations

import hashlib
import logging
import re

import numpy as np
import pytest
import torch
from torch import nn

from mechscope.cnn.data.images import (
    ImageDataset,
    check_recorded,
    load_dataset,
    load_idx_folder,
    make_dataset,
    read_class_names,
)
from mechscope.cnn.models.spec import walk
from mechscope.core.errors import DataError, MechscopeError
from tests.shapes import splits, write_idx
from tests.unit.test_cnn_models_truths import conv_out, loop_rf
from tests.unit.test_spec_outside_truths import support

# ---- data -----------------------------------------------------------------------------------------------------


def arrays(n_train=6, n_test=4, size=8, seed=0):
    """Distinct uint8 train and test images [N, H, W] and labels 0, 1, 2, 0, 1, 2, ..."""
    rng = np.random.default_rng(seed)
    x_train = rng.integers(0, 256, (n_train, size, size), dtype=np.uint8)
    x_test = rng.integers(0, 256, (n_test, size, size), dtype=np.uint8)
    return x_train, np.arange(n_train) % 3, x_test, np.arange(n_test) % 3


def refused(message: str, *args, **kw) -> None:
    with pytest.raises(DataError, match=re.escape(message)):
        make_dataset("d", *args, **kw)


def test_test_float_is_the_first_test_images_over_255():
    """Outside truth: numpy's division of the test split's own pixels (the train split differs everywhere)."""
    x_train, y_train, x_test, y_test = arrays()
    data = make_dataset("d", x_train, y_train, x_test, y_test)
    got = data.test_float(2).numpy()
    assert got.shape == (2, 1, 8, 8)
    np.testing.assert_allclose(got[:, 0], x_test[:2] / 255.0, rtol=0, atol=1e-7)
    assert data.describe()["n_test"] == 4 and data.describe()["n_train"] == 6


def test_to_float_of_images_without_a_channel_axis_gains_it_second():
    """Outside truth: numpy's x[:, None] / 255 of hand-made uint8 images [N, H, W] (H differs from W)."""
    x = np.random.default_rng(11).integers(0, 256, (3, 5, 7), dtype=np.uint8)
    got = ImageDataset.to_float(torch.from_numpy(x)).numpy()
    assert got.shape == (3, 1, 5, 7)
    np.testing.assert_allclose(got, x[:, None] / 255.0, rtol=0, atol=1e-7)


def test_a_non_square_channels_last_image_is_refused():
    """Outside truth: the module docstring (square images only); [N, 8, 10, 1] is 8×10 with one channel."""
    x_train, y_train, x_test, y_test = arrays()
    wide = np.zeros((6, 8, 10, 1), np.uint8)
    refused("expected square images with 1 or 3 channels", wide, y_train, np.zeros((4, 8, 10, 1), np.uint8), y_test)


def test_integer_pixels_just_below_zero_are_refused():
    """Outside truth: pixels are 0-255; an int64 image holding -1 is one below."""
    x_train, y_train, x_test, y_test = arrays()
    bad = x_train.astype(np.int64)
    bad[3, 2, 5] = -1
    refused("integer images must hold values 0-255", bad, y_train, x_test, y_test)


def test_the_first_non_finite_pixel_is_named_by_its_image_and_all_are_counted():
    """Outside truth: a hand-placed NaN in image 2 (channel 0) and an inf in image 4 of float images: 2 pixels."""
    x_train, y_train, x_test, y_test = arrays()
    bad = x_train.astype(np.float32) / 255
    bad[2, 1, 3], bad[4, 0, 0] = np.nan, np.inf
    refused("d x_train: 2 pixel(s) not finite (nan in image 2)", bad, y_train, x_test, y_test)


def test_boolean_labels_are_refused():
    """Outside truth: labels are integer class indices (the module docstring); True/False are not."""
    x_train, y_train, x_test, y_test = arrays()
    refused("labels must be integer class indices, got torch.bool", x_train, y_train % 2 == 0, x_test, y_test)


def test_a_label_of_two_to_the_63_is_beyond_int64():
    """Outside truth: int64 holds at most 2**63 - 1 (numpy's iinfo); a uint64 label of 2**63 does not fit."""
    x_train, y_train, x_test, y_test = arrays()
    assert np.iinfo(np.int64).max == 2**63 - 1
    big = y_train.astype(np.uint64)
    big[0] = np.uint64(2**63)
    refused("hold values beyond 64-bit integers", x_train, big, x_test, y_test)


def test_fewer_images_than_labels_is_refused():
    """Outside truth: one label per image; 5 train images against 6 labels, counted by hand."""
    x_train, y_train, x_test, y_test = arrays()
    refused("d: 5 images but 6 labels in the train split", x_train[:5], y_train, x_test, y_test)


def test_seven_pixels_are_refused_and_eight_accepted():
    """Outside truth: the documented minimum of 8×8, one pixel either side of it."""
    x_train, y_train, x_test, y_test = arrays(size=8)
    refused("images are 7×7; at least 8×8", x_train[:, :7, :7], y_train, x_test[:, :7, :7], y_test)
    assert make_dataset("d", x_train, y_train, x_test, y_test).shape == (1, 8, 8)


def test_train_and_test_images_with_different_channels_are_refused():
    """Outside truth: the test split is grey [N, 8, 8], the training split RGB [N, 8, 8, 3]."""
    x_train, y_train, x_test, y_test = arrays()
    rgb = np.repeat(x_train[..., None], 3, axis=-1)
    refused("d: train images are [3, 8, 8], test images [1, 8, 8]", rgb, y_train, x_test, y_test)


def test_an_empty_test_split_is_refused():
    """Outside truth: a classifier needs test images; zero of them, with zero labels."""
    x_train, y_train, _, _ = arrays()
    refused("d: the test split is empty", x_train, y_train, np.zeros((0, 8, 8), np.uint8), np.zeros(0, np.int64))


def test_a_label_equal_to_the_number_of_class_names_is_refused():
    """Outside truth: with k names the indices are 0..k-1; label 3 with three names is one past the end."""
    x_train, y_train, x_test, y_test = arrays()
    y_test = y_test.copy()
    y_test[1] = 3
    refused("label 3 in y_test out of range for 3 class names (0..2)", x_train, y_train, x_test, y_test,
            class_names=("cat", "dog", "eel"))  # fmt: skip


def test_one_trained_class_among_two_names_is_fewer_than_two():
    """Outside truth: every training label is 0, so only one class is present although two are named."""
    x_train, _, x_test, _ = arrays()
    zeros = np.zeros(6, np.int64)
    refused("fewer than two classes in the training labels", x_train, zeros, x_test, zeros[:4], class_names="ab")


def test_the_first_five_classes_without_training_images_are_listed():
    """Outside truth: ten names, training labels only 0 and 9, so classes 1..8 are empty; the first five by hand."""
    x_train, _, x_test, _ = arrays()
    y = np.array([0, 9, 0, 9, 0, 9])
    refused("class(es) [1, 2, 3, 4, 5] of 0..9 have no training images", x_train, y, x_test, y[:4],
            class_names=[f"c{i}" for i in range(10)])  # fmt: skip


def test_a_class_name_given_twice_is_refused():
    """Outside truth: 'dog' appears twice in the hand-written list."""
    x_train, y_train, x_test, y_test = arrays()
    refused("class name(s) 'dog' given more than once", x_train, y_train, x_test, y_test,
            class_names=("dog", "cat", "dog"))  # fmt: skip


def test_default_class_names_are_the_indices_from_zero():
    """Outside truth: labels 0, 1, 2 -> names '0', '1', '2' (the module docstring: indices are the classes)."""
    data = make_dataset("d", *arrays())
    assert data.class_names == ("0", "1", "2") and data.n_classes == 3


def test_class_names_file_lines_are_stripped_and_an_inner_blank_line_refused(tmp_path):
    """Outside truth: the file written by hand with padding spaces; a blank line between names is not a name."""
    (tmp_path / "n.txt").write_text("  cat \ndog\t\n eel\n\n")
    assert read_class_names(tmp_path / "n.txt") == ("cat", "dog", "eel")
    (tmp_path / "gap.txt").write_text("cat\n\ndog\n")
    with pytest.raises(DataError, match="one non-empty class name per line"):
        read_class_names(tmp_path / "gap.txt")


def test_an_idx_folder_keeps_the_users_class_names(tmp_path):
    """Outside truth: the names handed in, one per class the written labels hold; the labels read back equal them."""
    s = splits(n_train=70, n_test=35)
    k = int(s["y_train"].max()) + 1
    names = tuple(f"shape{i}" for i in range(k))
    data = load_idx_folder(write_idx(tmp_path / "d", s), class_names=names)
    assert data.class_names == names
    assert data.test_labels.tolist() == s["y_test"].astype(int).tolist()


def test_an_npz_is_named_by_its_stem_and_recorded_by_sha256_with_a_path_of_names(tmp_path):
    """Outside truth: hashlib's SHA-256 of the written file; the file name less '.npz'; a pathlib.Path of names."""
    x_train, y_train, x_test, y_test = arrays()
    np.savez(tmp_path / "mine.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    (tmp_path / "names.txt").write_text("cat\ndog\neel\n")
    data = load_dataset(str(tmp_path / "mine.npz"), class_names=tmp_path / "names.txt")
    assert data.name == "mine" and data.class_names == ("cat", "dog", "eel")
    assert data.source["sha256"] == hashlib.sha256((tmp_path / "mine.npz").read_bytes()).hexdigest()


def test_only_differing_checksums_are_warned_about(caplog):
    """Outside truth: two hand-made checksum records, one equal to the data's and one not."""
    data = make_dataset("d", *arrays(), source={"sha256": "a" * 64})
    with caplog.at_level(logging.WARNING, logger="mechscope.cnn.data.images"):
        check_recorded(data, {"sha256": "a" * 64})
        assert not caplog.records
        check_recorded(data, {"sha256": "b" * 64})
    assert len(caplog.records) == 1 and "checksums differ" in caplog.records[0].getMessage()


# ---- a user's own CNN ------------------------------------------------------------------------------------------


def net_a() -> nn.Sequential:
    """Stage 1 = layers 1-6 (a second pool after hook_out), stage 2 = layers 7-8, a linear read-out with dropout."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Identity(), nn.Conv2d(1, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout2d(0.25),
        nn.MaxPool2d(3, 2, padding=1), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Dropout(0.1), nn.Linear(54, 5),
    )  # fmt: skip


def net_b() -> nn.Sequential:
    """One stage and a hidden layer of 7 before 3 logits."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 7), nn.ReLU(), nn.Linear(7, 3))


CONV1, POOL1 = ((3, 3), (2, 2), (0, 0), (1, 1)), ((3, 3), (2, 2), (1, 1), (1, 1))
POOL2, CONV2 = ((2, 2), (2, 2), (0, 0), (1, 1)), ((3, 3), (1, 1), (1, 1), (1, 1))


def rf_tuple(rf):
    return rf.size, rf.jump, rf.start


def test_stages_shapes_and_receptive_fields_of_a_hand_built_stack():
    """Outside truth: torch's output-size formula by hand (28 -> 13 -> 7 -> 3 -> 3) and the Araujo recurrence as a
    plain loop; stage 2 sees through both pools of stage 1."""
    s = walk(net_a(), (1, 28, 28))
    h1 = conv_out(28, 3, 2)
    h_pool = conv_out(h1, 3, 2, 1)
    assert (h1, h_pool, conv_out(h_pool, 2, 2)) == (13, 7, 3)
    one, two = s.stages
    assert (one.in_channels, one.out_channels, two.in_channels, two.out_channels) == (1, 4, 4, 6)
    assert (one.shape_post, one.shape_out) == ((4, 13, 13), (4, 7, 7))
    assert (two.shape_post, two.shape_out) == ((6, 3, 3), (6, 3, 3))
    assert rf_tuple(one.rf_post) == loop_rf([CONV1])
    assert rf_tuple(one.rf_out) == loop_rf([CONV1, POOL1]) == ((7, 7), (4, 4), (-2, -2))
    assert rf_tuple(two.rf_post) == loop_rf([CONV1, POOL1, POOL2, CONV2]) == ((27, 27), (8, 8), (-10, -10))
    d = s.to_dict()["stages"][0]
    assert d["receptive_field_post"]["size"] == [3, 3] and d["receptive_field_out"]["size"] == [7, 7]


def test_stage_two_box_is_the_gradient_support_through_both_pools():
    """Outside truth: autograd through the Sequential itself, at the centre unit of stage 2 (by hand: start -10 + 8,
    size 27, so rows -2..24, clipped to 0..24)."""
    net = net_a().eval()
    s = walk(net, (1, 28, 28))
    x = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(2), requires_grad=True)
    out = net[:8](x)
    assert s.stages[1].rf_post.box(1, 1, 28, 28) == support(out[0, 0, 1, 1], x) == (0, 25, 0, 25)


def test_the_read_out_with_dropout_is_linear_and_has_no_hidden_layer():
    """Outside truth: Flatten, Dropout, Linear is W·flatten(out) + b (dropout is the identity in eval)."""
    s = walk(net_a(), (1, 28, 28))
    assert s.readout.linear is True and s.readout.hidden is None and s.n_classes == 5


def test_describe_architecture_and_parameter_groups_by_hand():
    """Outside truth: the layers as written in net_a and parameter counts as in_c·out_c·k·k + out_c (BatchNorm: 2·C)."""
    s = walk(net_a(), (1, 28, 28))
    assert s.stages[0].describe() == "Conv2d 1→4 3×3, BatchNorm2d, ReLU, MaxPool2d 3×3, MaxPool2d 2×2"
    rows = s.architecture()
    assert [r["shape"] for r in rows] == [[1, 28, 28], [4, 7, 7], [6, 3, 3], [5]]
    assert [r["parameters"] for r in rows] == [0, 1 * 4 * 9 + 4 + 2 * 4, 4 * 6 * 9 + 6, 54 * 5 + 5]
    assert rows[-1]["layer"] == "read-out: Linear 54→5"
    assert s.parameter_groups() == [("11", ["net.11"]), ("conv2", ["net.7"]), ("conv1", ["net.1", "net.2"])]
    assert s.stage("conv2.hook_out") is s.stages[1] and s.stage("1") is s.stages[0]


def test_a_hidden_layer_makes_the_read_out_non_linear():
    """Outside truth: net_b's two Linears by hand: hidden 7; 72·7 + 7 + 7·3 + 3 = 535 parameters; top-down order."""
    s = walk(net_b(), (1, 8, 8))
    assert s.readout.linear is False and s.readout.hidden == 7 and s.n_classes == 3
    row = s.architecture()[-1]
    assert row["layer"] == "read-out: Linear 72→7 → 7→3 (non-linear)" and row["parameters"] == 535
    assert s.parameter_groups() == [("5", ["net.5"]), ("3", ["net.3"]), ("conv1", ["net.0"])]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize(
    "padding, k, start, box",
    [("same", 4, -1, (4, 8, 4, 8)), ("valid", 3, 0, (5, 8, 5, 8)), (2, 3, -2, (3, 6, 3, 6))],
    ids=["same-even-kernel", "valid", "two"],
)
def test_conv_padding_modes_against_autograd(padding, k, start, box):
    """Outside truth: autograd through torch's conv (for 'same' with an even kernel torch pads 1 before, 2 after) and
    the box by hand for unit (5, 5)."""
    torch.manual_seed(3)
    conv = nn.Conv2d(1, 2, k, padding=padding)
    n = conv(torch.zeros(1, 1, 12, 12)).shape[-1]
    net = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(2 * n * n, 2))
    rf = walk(net, (1, 12, 12)).stages[0].rf_post
    assert rf.start == (start, start)
    x = torch.rand(1, 1, 12, 12, generator=torch.Generator().manual_seed(4), requires_grad=True)
    assert rf.box(5, 5, 12, 12) == support(conv(x)[0, 0, 5, 5], x) == box


def test_padding_after_a_stride_moves_the_start_by_padding_times_jump():
    """Outside truth: the loop (start -= p·jump: 0 - 1·2 = -2) and autograd at unit (0, 3), clipped at the top."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(2 * 7 * 7, 2))  # fmt: skip
    rf = walk(net, (1, 15, 15)).stages[1].rf_post
    assert rf_tuple(rf) == loop_rf([((3, 3), (2, 2), (0, 0), (1, 1)), ((3, 3), (1, 1), (1, 1), (1, 1))])
    x = torch.rand(1, 1, 15, 15, generator=torch.Generator().manual_seed(6), requires_grad=True)
    assert rf.box(0, 3, 15, 15) == support(net[:3](x)[0, 0, 0, 3], x) == (0, 5, 4, 11)


class Box(nn.Module):
    """A container holding a conv and a parameter of its own (a scale the walk could not replay)."""

    def __init__(self):
        super().__init__()
        self.conv, self.scale = nn.Conv2d(1, 2, 3), nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.conv(x) * self.scale


class WithShape(nn.Sequential):
    input_shape = (1, 8, 8)


@pytest.mark.parametrize(
    "net, shape, message",
    [
        (
            nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 2)),
            (1, 8, 8),
            "cannot read layer 0 (BatchNorm2d) before the first Conv2d",
        ),
        (net_a(), (1, 0, 28), "must be positive integers"),
        (net_a(), (True, 28, 28), "must be positive integers"),
        (nn.Sequential(Box(), nn.Flatten(), nn.Linear(72, 2)), (1, 8, 8), "cannot read layer 0 (Box)"),
    ],
    ids=["norm-first", "zero-height", "bool-channels", "container-with-parameter"],
)
def test_what_the_walk_refuses_at_its_boundaries(net, shape, message):
    """Outside truth: the module docstring's rules, each broken once by a hand-built model or shape."""
    with pytest.raises(MechscopeError, match=re.escape(message)):
        walk(net, shape)


def test_identity_before_the_first_conv_and_a_models_own_input_shape_are_accepted():
    """Outside truth: nn.Identity changes nothing (torch.equal of the outputs); WithShape says its images are 8×8."""
    torch.manual_seed(7)
    layers = [nn.Identity(), nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 2)]
    s = walk(WithShape(*layers))
    assert s.input_shape == (1, 8, 8) and s.stages[0].shape_post == (2, 6, 6)
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(8))
    assert torch.equal(s.model(x), s.model.net(x))


@pytest.mark.parametrize("mode", ["circular", "reflect"])
def test_a_circular_padded_conv_is_refused_and_a_reflecting_one_boxed(mode):
    """Outside truth: autograd through torch's padded conv. Circular: unit (0, 0) reads row and column 11 (wrapped
    round from -1), which no box of the corner can show, so the walk refuses the layer in one line. Reflect: what it
    reads stays inside its receptive-field box (0..2 clipped to the image)."""
    torch.manual_seed(9)
    conv = nn.Conv2d(1, 2, 3, padding=1, padding_mode=mode)
    net = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(2 * 12 * 12, 2))
    x = torch.rand(1, 1, 12, 12, generator=torch.Generator().manual_seed(10), requires_grad=True)
    if mode == "circular":
        assert support(conv(x)[0, 0, 0, 0], x) == (0, 12, 0, 12)
        with pytest.raises(MechscopeError, match=r"cannot read layer 0 \(Conv2d\) with circular padding"):
            walk(net, (1, 12, 12))
        return
    y0, y1, x0, x1 = walk(net, (1, 12, 12)).stages[0].rf_post.box(0, 0, 12, 12)
    sy0, sy1, sx0, sx1 = support(conv(x)[0, 0, 0, 0], x)
    assert y0 <= sy0 and sy1 <= y1 and x0 <= sx0 and sx1 <= x1 and (y0, y1, x0, x1) == (0, 2, 0, 2)


def test_a_class_names_file_with_a_byte_order_mark_reads_its_first_name_plainly(tmp_path):
    """Outside truth: Python's own "utf-8-sig" codec, which Windows Notepad's UTF-8 files need: the bytes
    EF BB BF before "cat" are a byte-order mark, not part of the first name."""
    p = tmp_path / "names.txt"
    p.write_bytes(b"\xef\xbb\xbfcat\ndog\n")
    assert p.read_bytes().decode("utf-8-sig").splitlines() == ["cat", "dog"]
    assert read_class_names(p) == ("cat", "dog")


@pytest.mark.parametrize("bad, said", [(float("inf"), "whole numbers"), (1e30, "label 1e+30 is not a class index")])
def test_float_labels_past_any_class_are_refused_as_given(bad, said):
    """Outside truth: IEEE arithmetic: inf is not a whole number, and 1e30 (a whole float) exceeds int64's largest
    value (numpy's iinfo), so converting it would wrap round; each is refused naming the value as given."""
    assert np.iinfo(np.int64).max < 1e30
    x = np.zeros((3, 8, 8), np.uint8)
    with pytest.raises(DataError, match=re.escape(said)):
        make_dataset("t", x, np.array([0.0, 1.0, bad]), x, np.array([0.0, 1.0, 0.0]))
