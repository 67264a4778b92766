"""Data sets: synthetic shapes, image folders, CIFAR-10 offline, latent mode with a tiny VAE."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import harness
from harness import UserError


def test_shapes_is_seeded_and_splits_are_disjoint():
    a = harness.create("dataset", "shapes", resolution=16, size=40, seed=3)
    b = harness.create("dataset", "shapes", resolution=16, size=40, seed=3)
    c = harness.create("dataset", "shapes", resolution=16, size=40, seed=4)
    val = harness.create("dataset", "shapes", resolution=16, size=40, seed=3, split="val")
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    train_set = {img.numpy().tobytes() for img in a.images}
    assert not any(img.numpy().tobytes() in train_set for img in val.images)
    x, y = a[7]
    assert x.shape == (3, 16, 16) and -1 <= x.min() and x.max() <= 1
    assert (a.num_classes, a.channels, a.resolution, len(a)) == (10, 3, 16, 40) and y == 7


def test_shapes_classes_differ_in_content():
    # A model can only use the label if the classes look different: the mean image of a
    # large-shape class must differ from the small-shape class of the same outline.
    ds = harness.create("dataset", "shapes", resolution=32, size=200)
    mean = lambda k: ds.images[ds.labels == k].float().std(0).mean()  # noqa: E731
    assert abs(mean(0) - mean(5)) > 1.0


def test_shapes_bad_options():
    with pytest.raises(UserError, match="num_classes"):
        harness.create("dataset", "shapes", resolution=16, num_classes=11)
    with pytest.raises(UserError, match="split"):
        harness.create("dataset", "shapes", resolution=16, split="test")


def _write(path, size, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), colour, np.uint8)).save(path)


def test_image_folder_labelled_and_unlabelled(tmp_path):
    for k, cls in enumerate(["cat", "dog"]):
        for i in range(5):
            _write(tmp_path / "lab" / cls / f"{i}.png", (40 + 7 * i, 30), 100 * k)
    train = harness.create("dataset", "image-folder", resolution=16, root=str(tmp_path / "lab"), val_fraction=0.2)
    val = harness.create("dataset", "image-folder", resolution=16, root=str(tmp_path / "lab"), split="val",
                         val_fraction=0.2)
    assert (len(train), len(val), train.num_classes, train.resolution) == (8, 2, 2, 16)
    # The class folder decides the label; colour tells which folder an image came from.
    for x, y in train:
        assert x.shape == (3, 16, 16)
        assert y == (0 if x.mean() < -0.5 else 1)
    for i in range(3):
        _write(tmp_path / "flat" / f"{i}.jpg", (20, 20), 50)
    flat = harness.create("dataset", "image-folder", resolution=8, root=str(tmp_path / "flat"), val_fraction=0.3)
    assert flat.num_classes == 0 and len(flat) == 2


def test_center_crop_keeps_the_middle():
    from harness_data.datasets import center_crop

    arr = np.zeros((20, 60, 3), np.uint8)
    arr[:, 20:40] = 255  # a white middle third
    out = np.asarray(center_crop(Image.fromarray(arr), 10))
    assert out.shape == (10, 10, 3) and out[:, 3:7].min() > 200


def test_image_folder_errors(tmp_path):
    with pytest.raises(UserError, match="root"):
        harness.create("dataset", "image-folder", resolution=16, root=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        harness.create("dataset", "image-folder", resolution=16, root=str(tmp_path / "empty"))


def test_cifar10_offline_says_where_to_put_the_files(tmp_path):
    with pytest.raises(UserError, match=r"cifar-10-batches-py.*cifar-10-python.tar.gz"):
        harness.create("dataset", "cifar10", resolution=32, root=str(tmp_path), download=False)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=16)
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return str(path)


def test_latent_mode_reports_latent_shape_and_caches(tiny_vae, tmp_path, monkeypatch):
    ds = harness.create("dataset", "shapes", resolution=16, size=12, vae=tiny_vae, cache_dir=str(tmp_path))
    assert (ds.channels, ds.resolution, ds.num_classes, len(ds)) == (4, 8, 10, 12)
    assert ds.cache_path.is_file() and ds.cache_path.parent.parent == tmp_path
    z, y = ds[3]
    assert z.shape == (4, 8, 8) and y == 3
    assert ds.decode(z[None]).shape == (1, 3, 16, 16)
    # Other content, other key.
    other = harness.create("dataset", "shapes", resolution=16, size=12, seed=1, vae=tiny_vae, cache_dir=str(tmp_path))
    assert other.cache_path != ds.cache_path
    # Second time: read from disk, the VAE encoder is not run.
    from diffusers import AutoencoderKL

    monkeypatch.setattr(AutoencoderKL, "encode", lambda *a, **k: pytest.fail("encoded again"))
    again = harness.create("dataset", "shapes", resolution=16, size=12, vae=tiny_vae, cache_dir=str(tmp_path))
    assert torch.equal(again.latents, ds.latents)


def test_backbone_gets_latent_shape(tiny_vae, tmp_path):
    from harness.context import CellContext
    from harness.suite import CellConfig

    cfg = CellConfig.model_validate({"backbone": {"name": "dit", "size": "tiny", "patch": 2},
                                     "data": {"name": "shapes", "resolution": 16, "size": 4, "vae": tiny_vae,
                                              "cache_dir": str(tmp_path)},
                                     "metrics": ["params"], "device": "cpu"})
    spec = CellContext("s", "c", 0, cfg).input_spec
    assert (spec["input_size"], spec["in_channels"], spec["num_classes"]) == (8, 4, 10)


def test_vae_that_cannot_load_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="vae"):
        harness.create("dataset", "shapes", resolution=16, size=2, vae=str(tmp_path / "nope"))
