"""harness.weights: weights a user names load as tensors, never as code; DiT train.py checkpoints."""
from __future__ import annotations

import argparse
import os
import pickle
import shutil

import pytest
import torch

import harness
from harness import UserError
from harness.weights import load_state_dict


class Evil:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _tiny_dit(**kw):
    return harness.create("backbone", "dit", size="tiny", input_size=8, patch=2, depth=1, hidden_size=32,
                          num_heads=2, num_classes=4, **kw)


def _train_py_checkpoint(path, model, ema):
    """What facebookresearch/DiT's train.py saves: model, ema, opt state and the argparse args."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "args": argparse.Namespace(model="DiT-XL/2", image_size=256, num_classes=1000, epochs=1400,
                                           global_batch_size=256, vae="ema", results_dir="results")}, path)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_a_pickle_with_code_is_refused_and_never_run(tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"weight": torch.zeros(2), "x": Evil(marker)}
    if legacy:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    else:
        torch.save(payload, path)
    with pytest.raises(UserError, match=r"weights '.*evil\.pth'") as err:
        load_state_dict(path)
    assert not marker.exists()
    assert "\n" not in str(err.value)
    if not legacy:  # the zip format names the global it would have called
        assert "system" in str(err.value) and "refused" in str(err.value)


def test_the_evil_pickle_would_run_with_plain_torch_load(tmp_path):
    """The test above is worth something: the same file does run code when fully unpickled."""
    marker = tmp_path / "pwned"
    torch.save({"x": Evil(marker)}, tmp_path / "evil.pth")
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert marker.exists()


def test_dit_train_py_checkpoint_takes_ema_by_default_and_model_on_request(tmp_path):
    torch.manual_seed(0)
    model, ema = _tiny_dit(), _tiny_dit()
    with torch.no_grad():
        for p, q in zip(model.parameters(), ema.parameters()):
            p.normal_(std=0.02)
            q.normal_(std=0.02)
    path = tmp_path / "0400000.pt"
    _train_py_checkpoint(path, model, ema)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 4]), torch.tensor([1, 2])
    for loaded, want in ((_tiny_dit(pretrained=str(path)), ema),
                         (_tiny_dit(pretrained=str(path), checkpoint_key="ema"), ema),
                         (_tiny_dit(pretrained=str(path), checkpoint_key="model"), model)):
        assert torch.equal(loaded.eval()(x, t, y), want.eval()(x, t, y))
    with pytest.raises(UserError, match=r"no 'emma' entry; did you mean 'ema'.*checkpoint_key"):
        _tiny_dit(pretrained=str(path), checkpoint_key="emma")
    with pytest.raises(UserError, match=r"entry 'opt' is a dict, not a state dict of tensors"):
        _tiny_dit(pretrained=str(path), checkpoint_key="opt")


def test_checkpoint_without_ema_names_its_entries(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": _tiny_dit().state_dict(), "step": {"n": torch.tensor(3)}}, path)
    with pytest.raises(UserError, match=r"has no 'ema' entry; known: model, step \(choose one with checkpoint_key\)"):
        _tiny_dit(pretrained=str(path))
    assert isinstance(_tiny_dit(pretrained=str(path), checkpoint_key="model"), torch.nn.Module)


def test_plain_state_dict_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    src = _tiny_dit()
    torch.save(src.state_dict(), tmp_path / "sd.pth")
    save_file(src.state_dict(), str(tmp_path / "sd.safetensors"))
    for name in ("sd.pth", "sd.safetensors"):
        got = _tiny_dit(pretrained=str(tmp_path / name)).state_dict()
        assert all(torch.equal(got[k], v) for k, v in src.state_dict().items())
    with pytest.raises(UserError, match="plain state dict, not a checkpoint with a 'model' entry"):
        _tiny_dit(pretrained=str(tmp_path / "sd.pth"), checkpoint_key="model")


@pytest.mark.parametrize("content", [b"", b"junk", b"not a checkpoint at all", bytes(range(256)) * 4])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".bin"])
def test_junk_files_are_one_line_errors(tmp_path, content, suffix):
    path = tmp_path / f"junk{suffix}"
    path.write_bytes(content)
    with pytest.raises(UserError, match=rf"pretrained '.*junk\{suffix}' is not a") as err:
        _tiny_dit(pretrained=str(path))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="is not a file"):
        _tiny_dit(pretrained=str(tmp_path / "missing.pt"))


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    state = _tiny_dit().state_dict()
    state.pop("pos_embed")
    state["extra.weight"] = torch.zeros(1)
    state["final_layer.linear.bias"] = torch.zeros(3)
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(UserError, match=r"does not fit DiT: 1 missing \(pos_embed\); 1 unexpected \(extra.weight\); "
                                        r"1 of another shape \(final_layer.linear.bias\)"):
        _tiny_dit(pretrained=str(tmp_path / "other.pt"))


def test_a_url_is_downloaded_once_then_read_safely(tmp_path, monkeypatch):
    src = _tiny_dit()
    served = tmp_path / "served"
    served.mkdir()
    torch.save({"ema": src.state_dict()}, served / "DiT-tiny.pt")
    marker = tmp_path / "pwned"
    torch.save({"ema": {"x": Evil(marker)}}, served / "evil.pt")
    fetched = []

    def fake_fetch(url, dst, *args, **kwargs):
        fetched.append(url)
        shutil.copy(served / url.rsplit("/", 1)[-1], dst)

    def never(*a, **k):
        raise AssertionError("load_state_dict_from_url unpickles: it must not be used")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr("harness.weights.fetch", fake_fetch)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", never)
    url = "https://example.org/weights/DiT-tiny.pt"
    for _ in range(2):
        got = _tiny_dit(pretrained=url).state_dict()
        assert all(torch.equal(got[k], v) for k, v in src.state_dict().items())
    assert fetched == [url] and (tmp_path / "hub" / "checkpoints" / "DiT-tiny.pt").is_file()
    with pytest.raises(UserError, match="refused"):
        _tiny_dit(pretrained="https://example.org/evil.pt")
    assert not marker.exists()

    monkeypatch.undo()  # the real download, from a port nothing listens on (loopback only)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match=rf"pretrained: cannot download http://127.0.0.1:{port}/gone.pt "
                                        r"\(ConnectionError: .*\); or download it yourself"):
        _tiny_dit(pretrained=f"http://127.0.0.1:{port}/gone.pt")


def test_lamamba_takes_the_same_checkpoint_key(tmp_path):
    def tiny(**kw):
        return harness.create("backbone", "lamamba", size="tiny", input_size=8, num_classes=4, widths=[8, 8, 8, 8],
                              depths=[1, 1, 1, 1], bottleneck_depth=1, num_heads=2, **kw)

    model, ema = tiny(), tiny()
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(1.0)
    path = tmp_path / "ckpt.pt"
    _train_py_checkpoint(path, model, ema)
    got = tiny(pretrained=str(path), checkpoint_key="model").state_dict()
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
    got = tiny(pretrained=str(path)).state_dict()
    assert all(torch.equal(got[k], v) for k, v in ema.state_dict().items())


def test_a_yacs_config_is_read_as_plain_dicts_without_importing_yacs(tmp_path, monkeypatch):
    """VMamba-family train.py (LaMamba-Diff's too) saves its yacs CfgNode under "config"."""
    import sys

    from yacs.config import CfgNode

    from harness.weights import read_tensors

    cfg = CfgNode({"MODEL": {"VSSM": {"SSM_D_STATE": 1, "DEPTHS": [2, 2, 2, 2]}}, "BETAS": (0.9, 0.999)})
    cfg.freeze()
    path = tmp_path / "ckpt.pt"
    torch.save({"ema": {"w": torch.ones(2)}, "config": cfg}, path)
    for name in [m for m in sys.modules if m == "yacs" or m.startswith("yacs.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "yacs", None)  # any import of yacs would now fail
    got = read_tensors(path)["config"]
    assert type(got).__name__ == "OrderedDict" and type(got["MODEL"]["VSSM"]).__name__ == "OrderedDict"
    assert got == {"MODEL": {"VSSM": {"SSM_D_STATE": 1, "DEPTHS": [2, 2, 2, 2]}}, "BETAS": (0.9, 0.999)}
    assert torch.equal(load_state_dict(path, key_option="checkpoint_key")["w"], torch.ones(2))


def test_counting_structure_reads_no_checkpoint_but_a_cell_checks_it(tmp_path, monkeypatch):
    # `validate --costs` builds on meta without reading weights (a URL is not fetched); a local
    # file must still be there. A cell's own meta build reads and checks the checkpoint, so its
    # parameter count is never of a model the checkpoint does not fit.
    import harness_dit.models as dit_models

    from harness import backbone_context, structure_only
    from harness.weights import counting_structure

    read = []
    monkeypatch.setattr("harness.weights.read_tensors", lambda *a, **k: read.append(a) or {})
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    options = {"size": "tiny", "patch": 4, "input_size": 8}
    assert not structure_only()
    with counting_structure():
        assert structure_only()
        for source in (str(tmp_path / "junk.pt"), "https://example.invalid/DiT-XL-2-256x256.pt"):
            meta = backbone_context("dit", {**options, "pretrained": source}).build_backbone(device="meta")
            assert all(p.is_meta for p in meta.parameters()) and not read
        with pytest.raises(harness.UserError, match="is not a file"):  # a missing file is still an error
            backbone_context("dit", {**options, "pretrained": str(tmp_path / "missing.pt")}).build_backbone(
                device="meta")
    assert not structure_only()
    with pytest.raises(harness.UserError):  # outside, even on meta, the checkpoint is read and checked
        backbone_context("dit", {**options, "pretrained": str(tmp_path / "junk.pt")}).build_backbone(device="meta")
    assert read
    with pytest.raises(harness.UserError):
        dit_models.dit(**options, pretrained=str(tmp_path / "junk.pt"))


def test_a_checkpoint_that_cannot_be_had_is_tried_once_per_cell(tmp_path, monkeypatch):
    # A stalled URL is a UserError on the meta build; building again for real would wait as long
    # again for the same answer, so the cell fails at the first.
    from harness import backbone_context

    calls = []

    def stalled(*args, **kwargs):
        calls.append(args)
        raise UserError("weights http://127.0.0.1:9/w.pt did not answer within the read timeout of 1 s")

    monkeypatch.setattr("harness.weights.download", stalled)
    ctx = backbone_context("dit", {"size": "tiny", "patch": 4, "input_size": 8, "pretrained": "http://127.0.0.1:9/w.pt"})
    with pytest.raises(UserError, match="did not answer"):
        ctx.abstract_model()
    assert len(calls) == 1
