"""Plumbing shared by the language and vision wings against outside truths: torch's own module flags and thread count,
parameter counts summed by hand over named shapes, a fake clock, pass counts known by construction, tokenizers built
with the ``tokenizers`` library and the real GPT-2 files read with json, tinyshakespeare read with plain Python, and
the CNN trainer against a hand-written loop over the same seeded batches."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math

import pytest
import torch
from torch import nn

from mechscope.core import torch_utils as tu
from mechscope.core.errors import MechscopeError
from mechscope.lm.tokenizer import Tokenizer
from tests.unit.test_tokenizer import gpt2_files  # noqa: F401  (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- evaluating, torch_threads, n_parameters, Timer ----------------------------------------------------------------


def _net() -> nn.Sequential:
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Sequential(nn.BatchNorm1d(2)))
    net.train()
    net[1].eval()  # a submodule in eval inside a model in train mode
    return net


def test_evaluating_restores_every_submodules_own_flag_even_after_an_error():
    """Truth: torch's ``module.training`` flags read before the block, submodule by submodule."""
    a, b = _net(), _net()
    b[2][0].eval()
    before = [[m.training for m in net.modules()] for net in (a, b)]
    assert before[0] != before[1]
    with pytest.raises(ValueError), tu.evaluating(a, b) as first:
        assert first is a
        assert not any(m.training for net in (a, b) for m in net.modules())
        raise ValueError("inside")
    assert [[m.training for m in net.modules()] for net in (a, b)] == before


def test_torch_threads_is_restored_after_an_exception():
    """Truth: ``torch.get_num_threads()`` read before the block and inside it."""
    before = torch.get_num_threads()
    target = 2 if before == 1 else 1
    with pytest.raises(KeyError), tu.torch_threads(target):
        assert torch.get_num_threads() == target
        raise KeyError("inside")
    assert torch.get_num_threads() == before
    with tu.torch_threads(None):
        assert torch.get_num_threads() == before


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 3)
        self.out = nn.Linear(3, 7, bias=True)
        self.out.weight = self.emb.weight  # tied: one tensor, two names
        self.frozen = nn.Parameter(torch.zeros(4, 5), requires_grad=False)


def test_n_parameters_counts_a_tied_tensor_once_and_frozen_ones_too():
    """Truth: a plain sum of the products of the shapes, by hand: 7*3 (emb = out.weight) + 7 + 4*5 = 48."""
    model = Tied()
    assert 7 * 3 + 7 + 4 * 5 == 48
    assert tu.n_parameters(model) == 48


def test_timer_adds_up_sections_on_a_fake_clock(monkeypatch):
    """Truth: hand arithmetic on a clock that reads 100, 101, 103.5, 104, 104.25, 110 (no real time)."""
    ticks = iter([100.0, 101.0, 103.5, 104.0, 104.25, 110.0])
    monkeypatch.setattr(tu.time, "perf_counter", lambda: next(ticks))
    timer = tu.Timer("t")
    with timer.section("a"):
        pass
    with timer.section("a"):
        pass
    timer.add("load", 1.5)
    timer.add("load", 0.75)
    assert timer.seconds == {"a": 2.75, "load": 2.25}
    assert timer.total() == 10.0


# ---- WorkCounter, combine_work -------------------------------------------------------------------------------------


class Pair(nn.Module):
    """A layer with a tuple output whose second element carries no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        y = self.lin(x)
        return y, y.detach()


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Pair() for _ in range(3)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)[0]
        return x


def test_backward_rows_count_per_layer_and_stop_when_the_counting_ends():
    """Truth: by construction, one forward and one backward of 5 rows through 3 layers inside the block (15 rows
    each way, 5 per whole pass), then a backward of a graph built inside but run after the block: not counted."""
    torch.manual_seed(0)
    model = Stack()
    counter = tu.WorkCounter(model.layers, "rows")
    with counter.counting():
        model(torch.randn(5, 3)).sum().backward()
        kept = model(torch.randn(2, 3)).sum()
    kept.backward()
    work = counter.summary(5)
    assert (counter.forward_rows, counter.backward_rows) == (15 + 6, 15)
    assert work["backward_rows"] == 5 and work["forward_rows"] == 7
    assert work["backward_passes"] == 1.0 and work["forward_passes"] == 1.4
    assert work["layer_calls"] == {"forward": 6, "backward": 3}


def _part(fwd: int, bwd: int, calls_f: int, calls_b: int) -> dict:
    return {"unit": "images", "forward_images": fwd, "backward_images": bwd,
            "layer_calls": {"forward": calls_f, "backward": calls_b}}  # fmt: skip


def test_combine_work_by_hand(caplog):
    """Truth: hand sums of distinct numbers: forward 30 + 70, backward 20 + 5, in passes of 40 images."""
    parts = {"train": _part(30, 20, 3, 2), "eval": _part(70, 5, 7, 1)}
    with caplog.at_level(logging.INFO, logger="mechscope.core.torch_utils"):
        work = tu.combine_work(parts, "both", 40)
    assert work == {
        "unit": "images", "rows_per_pass": 40, "forward_passes": 2.5, "backward_passes": 0.625,
        "forward_images": 100, "backward_images": 25, "layer_calls": {"forward": 10, "backward": 3},
        "parts": {"train": {"forward_passes": 0.75, "backward_passes": 0.5},
                  "eval": {"forward_passes": 1.75, "backward_passes": 0.125}},
    }  # fmt: skip
    assert caplog.messages == ["both: 2.5 forward and 0.625 backward passes of 40 images"]


# ---- tokenizers ----------------------------------------------------------------------------------------------------


def test_gpt2_special_token_and_vocabulary_edges(gpt2_files):  # noqa: F811
    """Truth: encoder.json read with json (<|endoftext|> = 50256, 50,257 entries)."""
    encoder = json.loads((gpt2_files / "encoder.json").read_text(encoding="utf-8"))
    eot, n = encoder["<|endoftext|>"], len(encoder)
    tok = Tokenizer.from_gpt2_files(gpt2_files / "encoder.json", gpt2_files / "vocab.bpe")
    assert (tok.bos_token_id, tok.eos_token_id, tok.vocab_size, tok.add_bos) == (eot, eot, n, False)
    assert tok.decode([n - 1]) == "<|endoftext|>" and tok.encode("<|endoftext|>") == [eot]
    assert tok.encode("a", add_bos=True) == [eot, encoder["a"]]
    for bad in (n, -1):
        with pytest.raises(MechscopeError, match=f"token id {bad} outside the vocabulary 0..{n - 1}"):
            tok.decode([encoder["a"], bad])


def _word_level_dir(tmp_path, template: bool, config: dict, tcfg: dict | None = None):
    """A tokenizer.json made by the ``tokenizers`` library itself: words <s>=0, a=1, b=2, </s>=3, [UNK]=4."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers, processors

    vocab = {"<s>": 0, "a": 1, "b": 2, "</s>": 3, "[UNK]": 4}
    backend = Backend(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if template:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    if tcfg is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(tcfg))
    return backend


def test_hf_dir_specials_and_bos_follow_the_post_processor(tmp_path):
    """Truth: the ``tokenizers`` library's own encode with special tokens ([0, 1, 2] for "a b" with the template,
    [1, 2] without); a config list's first id; a tokenizer_config token given as {"content": ...}."""
    with_bos = _word_level_dir(tmp_path, True, {"bos_token_id": [0, 3], "eos_token_id": 3})
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.add_bos) == (0, 3, True)
    assert tok.encode("a b") == with_bos.encode("a b").ids == [0, 1, 2]
    plain = _word_level_dir(tmp_path, False, {"bos_token_id": 0}, {"eos_token": {"content": "</s>"}})
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.add_bos) == (0, 3, False)
    assert tok.encode("b a") == plain.encode("b a").ids == [2, 1]


def _gguf_meta(**kw) -> dict:
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["a", "b", "ab", "<s>", "a", "1", "2", "12"],
        "tokenizer.ggml.merges": ["a b", "1 2"],
        "tokenizer.ggml.token_type": [1, 1, 1, 3, 1, 1, 1, 1],
        "tokenizer.ggml.bos_token_id": 3,
        "tokenizer.ggml.eos_token_id": 2,
    }
    return {**meta, **kw}


def test_gguf_tokenizer_on_a_hand_built_vocabulary():
    """Truth: a vocabulary written by hand: a duplicated token keeps its first id (0, not 4), the control token <s>
    (type 3) is one id, "ab" merges, BOS first only when the metadata asks; GPT-2's split keeps "12" whole and the
    smollm rule splits digits one by one."""
    tok = Tokenizer.from_gguf_meta(_gguf_meta())
    assert (tok.bos_token_id, tok.eos_token_id, tok.add_bos) == (3, 2, False)
    assert tok.encode("ba") == [1, 0] and tok.encode("ab") == [2]
    assert tok.encode("<s>ab") == [3, 2] and tok.decode([3, 2, 0]) == "<s>aba"
    assert tok.encode("12") == [7]
    with_bos = Tokenizer.from_gguf_meta(_gguf_meta(**{"tokenizer.ggml.add_bos_token": True}))
    assert with_bos.encode("ab") == [3, 2] and with_bos.encode("ab", add_bos=False) == [2]
    smol = Tokenizer.from_gguf_meta(_gguf_meta(**{"tokenizer.ggml.pre": "smollm"}))
    assert smol.encode("12") == [5, 6]


# ---- text ----------------------------------------------------------------------------------------------------------


def test_default_text_is_tinyshakespeare_byte_for_byte(mnist_root, monkeypatch):
    """Truth: the data README's size (1,115,394 bytes) and sha256 of tinyshakespeare/input.txt, read with plain
    Python; a given file is read as itself."""
    from mechscope.lm.text import read_text

    monkeypatch.setenv("MECHSCOPE_DATA", str(mnist_root))
    text, where = read_text(None)
    raw = (mnist_root / "tinyshakespeare" / "input.txt").read_bytes()
    assert where == str(mnist_root / "tinyshakespeare" / "input.txt")
    assert len(raw) == 1_115_394 and text == raw.decode("utf-8")
    assert hashlib.sha256(text.encode()).hexdigest().startswith("86c4e6aa9db7c042")
    assert text[:14] == "First Citizen:"


def test_a_given_text_file_is_read_not_the_default(tmp_path):
    """Truth: the file's own contents, written here."""
    from mechscope.lm.text import read_text

    (tmp_path / "t.txt").write_text("to be or not\n", encoding="utf-8")
    assert read_text(tmp_path / "t.txt") == ("to be or not\n", str(tmp_path / "t.txt"))


# ---- CNN training and runs -----------------------------------------------------------------------------------------


def test_evaluate_per_class_accuracy_divides_by_the_true_class_count():
    """Truth: by hand, predictions [0, 0, 0, 1] for labels [0, 1, 1, 1]: class 0 1/1 right, class 1 1/3 (the
    predicted-column counts would give 1/3 and 1/1); the loss is the formula -log softmax of one-hot logits."""
    from mechscope.cnn.training import evaluate

    class Fixed(nn.Module):
        def forward(self, x):
            return nn.functional.one_hot(x[:, 0, 0, 0].long(), 2).float()

    pred, labels = torch.tensor([0, 0, 0, 1]), torch.tensor([0, 1, 1, 1])
    e = evaluate(Fixed(), pred.float().view(4, 1, 1, 1), labels, 2)
    assert e.confusion_matrix == [[1, 0], [2, 1]]
    assert e.per_class_accuracy == pytest.approx([1.0, 1 / 3]) and e.accuracy == 0.5
    right, wrong = -math.log(math.e / (math.e + 1)), -math.log(1 / (math.e + 1))
    assert e.loss == pytest.approx((2 * right + 2 * wrong) / 4, rel=1e-6)


def _hand_loop(data, cfg, mcfg, total):
    """The training written out: seeded init, randperm batches (each shifted at random when ``cfg.shift``: the
    batches' own generator), AdamW + one-cycle, cross-entropy with label smoothing; the losses of each epoch."""
    from mechscope.cnn.models.cnn import CNN
    from mechscope.cnn.training import random_shift

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = CNN(mcfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y = data.train_images[: cfg.train_limit].float().div(255), data.train_labels[: cfg.train_limit]
    x = x if x.dim() == 4 else x.unsqueeze(1)  # [N, C, H, W], or grey [N, H, W]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=cfg.warmup_fraction)
    losses, step = [], 0
    for _ in range(cfg.epochs):
        order, epoch = torch.randperm(len(x), generator=gen), []
        for i in range(len(x) // cfg.batch_size):
            if step == total:
                break
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            batch = random_shift(x[idx], cfg.shift, gen) if cfg.shift else x[idx]
            loss = nn.functional.cross_entropy(model(batch), y[idx], label_smoothing=cfg.label_smoothing)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            epoch.append(loss.item())
        losses.append(epoch)
    return model.eval(), losses


@pytest.fixture(scope="module")
def trained(mnist):
    from mechscope.cnn.config import TrainConfig
    from mechscope.cnn.models.cnn import CNNConfig
    from mechscope.cnn.training import train_cnn

    small = dataclasses.replace(mnist, test_images=mnist.test_images[:30], test_labels=mnist.test_labels[:30])
    cfg = TrainConfig(epochs=2, batch_size=16, train_limit=70, max_steps=6, seed=5, shift=0, label_smoothing=0.1)
    mcfg = CNNConfig(channels=(3,), kernel_size=5, pool=4)
    with torch.random.fork_rng(devices=[]):
        return train_cnn(small, cfg, mcfg, progress=False), _hand_loop(small, cfg, mcfg, 6), small


def test_cnn_trainer_matches_a_hand_written_loop(trained):
    """Truth: the hand loop above over the same seeded batches: 70 images in batches of 16 give 4 steps an epoch
    (the ragged 6 dropped), max 6 steps stop epoch 2 after 2; each epoch's loss is the mean of its own steps."""
    result, (model, losses), _ = trained
    assert [len(e) for e in losses] == [4, 2] and result.steps == 6
    assert [(h["epoch"], h["step"]) for h in result.history] == [(1, 4), (2, 6)]
    for h, epoch in zip(result.history, losses, strict=True):
        assert h["train_loss"] == pytest.approx(sum(epoch) / len(epoch), rel=1e-4)
    assert not result.model.training
    for (name, p), q in zip(result.model.state_dict().items(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_cnn_evaluation_and_work_by_hand(trained):
    """Truth: the test images' accuracy and loss by a plain loop over the hand loop's model; the work counted by
    hand: 6 steps of 16 images forward and back, plus the 30 test images forward, in passes of the 70 images."""
    result, (model, _), small = trained
    x = small.test_images.float().div(255).unsqueeze(1)
    with torch.no_grad():
        logits = model(x)
    hits = [int(logits[i].argmax()) == int(small.test_labels[i]) for i in range(30)]
    nll = [float(torch.logsumexp(logits[i], 0) - logits[i, small.test_labels[i]]) for i in range(30)]
    e = result.evaluation
    assert e.accuracy == pytest.approx(sum(hits) / 30) and e.loss == pytest.approx(sum(nll) / 30, rel=1e-4)
    assert sum(map(sum, e.confusion_matrix)) == 30
    w = result.work
    assert (w["rows_per_pass"], w["forward_images"], w["backward_images"]) == (70, 96 + 30, 96)
    assert (w["forward_passes"], w["backward_passes"]) == (round(126 / 70, 3), round(96 / 70, 3))


def test_run_directory_files_read_back_with_json(trained, tmp_path):
    """Truth: the run's metrics.json and config.json read with the json module, field by field, and a count of the
    tiny network's parameters by hand: conv 3*1*5*5 + 3, read-out 3*6*6*10 + 10."""
    import mechscope
    from mechscope.cnn.runs import save_run
    from mechscope.cnn.training import RunMetrics

    result = trained[0]
    metrics = RunMetrics.of(result, "jihgfedcba").to_dict()
    names = list("jihgfedcba")  # not sorted
    save_run(tmp_path, result.model, {"seed": 5, "data": {"name": "mnist", "kind": "builtin", "class_names": names}},
             metrics)  # fmt: skip
    got = json.loads((tmp_path / "metrics.json").read_text())
    assert got["n_parameters"] == 3 * 25 + 3 + 3 * 6 * 6 * 10 + 10
    assert (got["steps"], got["class_names"], got["test_accuracy"]) == (6, names, result.evaluation.accuracy)
    assert got["train_seconds"] == result.train_seconds and got["work"]["forward_images"] == 126
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["kind"], cfg["seed"], cfg["model"]["channels"], cfg["model"]["pool"]) == ("cnn", 5, [3], 4)
    run = mechscope.load_run(tmp_path)
    assert run.class_names == tuple(names) and run.metrics == got


def test_a_run_of_five_stages_or_float64_weights_is_refused(tmp_path):
    """Truth: the documented limits, by hand: 1 to 4 stage widths; weights of the dtype the model holds (float32)."""
    from safetensors.torch import load_file, save_file

    import mechscope
    from mechscope.cnn.models.cnn import CNN
    from mechscope.cnn.runs import save_run
    from mechscope.core.errors import RunError

    torch.manual_seed(0)
    save_run(tmp_path, CNN(), {"data": {"name": "mnist", "kind": "builtin"}}, {})
    cfg = json.loads((tmp_path / "config.json").read_text())
    state = load_file(str(tmp_path / "model.safetensors"))
    save_file({k: v.double() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(RunError, match="is float64; expected float32"):
        mechscope.load_run(tmp_path)
    cfg["model"]["channels"] = [2, 2, 2, 2, 2]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RunError, match="holds 5 widths; expected 1 to 4"):
        mechscope.load_run(tmp_path)


def test_another_runs_weights_under_this_runs_config_are_refused(tmp_path):
    """Truth: two trainings with different seeds have different weights (their sha256 differ, read with hashlib)."""
    import mechscope
    from mechscope.cnn.models.cnn import CNN
    from mechscope.cnn.runs import save_run
    from mechscope.core.errors import RunError

    for seed in (0, 1):
        torch.manual_seed(seed)
        (tmp_path / str(seed)).mkdir()
        save_run(tmp_path / str(seed), CNN(), {"data": {"name": "mnist", "kind": "builtin"}}, {})
    a, b = ((tmp_path / s / "model.safetensors").read_bytes() for s in "01")
    assert hashlib.sha256(a).digest() != hashlib.sha256(b).digest()
    (tmp_path / "0" / "model.safetensors").write_bytes(b)
    with pytest.raises(RunError, match="come from different trainings"):
        mechscope.load_run(tmp_path / "0")
