"""`lm heads` and `lm circuits` end to end in bfloat16 on a tiny random checkpoint of every family."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

from mechscope.lm.methods.heads import HeadsResult  # noqa: E402
from tests.e2e.test_cli import run_main  # noqa: E402
from tests.parity.families import configs, save_random  # noqa: E402
from tests.records import assert_round_trip  # noqa: E402

FAMILIES = list(configs(transformers))
# post-LN (OPT-350m): no residual stream the heads write into linearly; the analyses refuse it in one line
POST_LN = {"opt-postln-projected"}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    cfgs, out = configs(transformers), {}
    for name in FAMILIES:
        out[name] = tmp_path_factory.mktemp(name)
        save_random(transformers, cfgs[name], out[name])
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_heads_and_circuits_in_bfloat16(name, family_dirs, capsys, tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("MECHSCOPE_DEVICE", "cpu")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = str(family_dirs[name])
        if name in POST_LN:
            for command in (["heads", "--n", "10", "--batch", "2"], ["circuits"]):
                out = str(tmp_path / command[0])
                code, _, err = run_main(capsys, "lm", *command, "--model", path, "--out", out)
                assert code == 2 and err.strip().splitlines()[-1].startswith("mechscope: error: a post-LN model")
            return
        code, _, err = run_main(
            capsys,
            "lm",
            "heads",
            "--model",
            path,
            "--dtype",
            "bfloat16",
            "--n",
            "10",
            "--batch",
            "2",
            "--out",
            str(tmp_path / "heads"),
        )
        assert code == 0, err
        data = assert_round_trip(tmp_path / "heads" / "heads.json", HeadsResult)
        assert data["loss_first_half"] > 0
        code, _, err = run_main(
            capsys, "lm", "circuits", "--model", path, "--dtype", "bfloat16", "--out", str(tmp_path / "circuits")
        )
        assert code == 0, err
        assert (tmp_path / "circuits" / "circuits.json").is_file()
    finally:
        torch.set_num_threads(before)
