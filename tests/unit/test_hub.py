"""Hub ids: a fake Hugging Face cache (a branch per training step, as Pythia's), and the offline error."""

from __future__ import annotations

import shutil

import pytest

from mechscope.core.errors import MechscopeError
from mechscope.lm.models.hub import resolve_hub, split_revision

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def fake_cache(tmp_path, monkeypatch):
    """``EleutherAI/pythia-70m`` at revision ``step3000`` in a private HF cache; offline."""
    repo = tmp_path / "hub" / "models--EleutherAI--pythia-70m"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"model_type": "gpt_neox"}')
    (repo / "refs").mkdir()
    (repo / "refs" / "step3000").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return snapshot


def test_revision_from_the_cache(fake_cache):
    assert resolve_hub("EleutherAI/pythia-70m", revision="step3000") == fake_cache
    assert resolve_hub("pythia-70m@step3000") == fake_cache  # short name, revision in the id


def test_missing_revision_says_what_to_download(fake_cache):
    with pytest.raises(MechscopeError) as e:
        resolve_hub("EleutherAI/pythia-70m", revision="step9")
    message = str(e.value)
    assert "not in the Hugging Face cache" in message and "revision 'step9'" in message
    assert "`hf download EleutherAI/pythia-70m --revision step9`" in message and "\n" not in message


def test_two_revisions_refused():
    assert split_revision("EleutherAI/pythia-70m@step1", None) == ("EleutherAI/pythia-70m", "step1")
    with pytest.raises(MechscopeError, match="two revisions"):
        split_revision("EleutherAI/pythia-70m@step1", "step2")


def test_load_model_from_the_fake_cache(fake_cache, tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    from mechscope.lm.models.loading import load_model

    cfg = transformers.GPTNeoXConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    torch.manual_seed(0)
    ref = transformers.GPTNeoXForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path / "saved")
    for f in (tmp_path / "saved").iterdir():
        shutil.copy(f, fake_cache / f.name)
    model, _ = load_model("EleutherAI/pythia-70m", revision="step3000", device="cpu")
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(MechscopeError, match="a revision .* needs a hub id"):
        load_model(fake_cache, revision="step3000")


def test_offline_without_the_variable_is_one_line_at_once(tmp_path, monkeypatch):
    """No HF_HUB_OFFLINE, no cache, and a hub host that does not resolve: huggingface_hub retried for ~25 s before
    the one line; the line now comes before any connection is tried."""
    import socket

    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    asked = []

    def no_dns(host, *a, **k):
        asked.append(host)
        raise socket.gaierror(-2, "Name or service not known")

    def download(repo, **kw):
        if not kw.get("local_files_only"):
            pytest.fail("a download was tried")
        raise FileNotFoundError(repo)

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    with pytest.raises(MechscopeError, match=r"could not be downloaded.*\(offline: huggingface.co does not resolve\)"):
        resolve_hub("no-such/model")
    assert asked == ["huggingface.co"]
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # a proxy resolves the host: no early answer
    from mechscope.lm.models.hub import hub_host_unresolved

    assert hub_host_unresolved() == ""
