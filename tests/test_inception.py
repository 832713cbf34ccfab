"""FID Inception-v3: parity with a torch reference of pytorch-fid's FIDInceptionV3, weight loading.

Neither pytorch-fid nor torchvision is installed, so the reference is written out below with
torchvision's module names (which are the names in pytorch-fid's .pth) and pytorch-fid's FID
quirks: average pools that exclude padding, a max pool in Mixed_7c, bilinear resize with
align_corners=False, inputs scaled to [-1, 1]. Every parameter and BatchNorm statistic is random.

The parity input is 139 x 139, the smallest size at which the last grid is 3 x 3 (at 75 it is
1 x 1 and the E blocks' pools would be identities, so their quirks would go untested).
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unclip_jax.evaluate import inception as inc
from unclip_jax.io import safetensors
from unclip_jax.torch_weights import CheckpointMismatchError

SIZE = 139


# ----------------------------------------------------------------------------- torch reference

class Conv(nn.Module):
    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg3(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class RefA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, padding=1)
        self.branch_pool = Conv(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(avg3(x))], 1)


class RefB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = Conv(cin, 64, 1)
        self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2)], 1)


class RefC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = Conv(cin, 192, 1)
        self.branch7x7_1 = Conv(cin, c7, 1)
        self.branch7x7_2 = Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = Conv(cin, c7, 1)
        self.branch7x7dbl_2 = Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([
            self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), d,
            self.branch_pool(avg3(x))], 1)


class RefD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = Conv(cin, 192, 1)
        self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7,
                          F.max_pool2d(x, 3, stride=2)], 1)


class RefE(nn.Module):
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = Conv(cin, 320, 1)
        self.branch3x3_1 = Conv(cin, 384, 1)
        self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = Conv(cin, 448, 1)
        self.branch3x3dbl_2 = Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = Conv(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        p = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
                          self.branch_pool(p)], 1)


class RefFIDInception(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.size = size
        self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = RefA(192, 32), RefA(256, 64), RefA(288, 64)
        self.Mixed_6a = RefB(288)
        self.Mixed_6b, self.Mixed_6c = RefC(768, 128), RefC(768, 160)
        self.Mixed_6d, self.Mixed_6e = RefC(768, 160), RefC(768, 192)
        self.Mixed_7a = RefD(768)
        self.Mixed_7b, self.Mixed_7c = RefE(1280, max_pool=False), RefE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # in pytorch-fid's file, unused for features

    def forward(self, images01):  # NCHW in [0, 1]
        x = F.interpolate(images01, size=(self.size, self.size), mode="bilinear",
                          align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def randomize(model, seed):
    """Every parameter and BatchNorm statistic random, activations kept O(1) (He-scaled convs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            r = torch.rand(t.shape, generator=g)
            if name.endswith("conv.weight"):
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / t[0].numel()) ** 0.5)
            elif name.endswith("running_var"):
                t.copy_(0.5 + r)
            elif name.endswith("bn.weight"):
                t.copy_(0.8 + 0.4 * r)
            else:  # bn bias, running mean, fc
                t.copy_(0.2 * (r - 0.5))
    return model.eval()


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(torch reference, its state dict saved as safetensors and as a .pth)."""
    model = randomize(RefFIDInception(SIZE), seed=0)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    folder = tmp_path_factory.mktemp("inception")
    st = str(folder / "fid_inception.safetensors")
    safetensors.write(st, {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")})
    pth = str(folder / inc.PTH_NAME)
    torch.save(model.state_dict(), pth)
    return model, st, pth


def test_parity_with_torch_reference(reference):
    ref, st, _ = reference
    rng = np.random.default_rng(0)
    # Non-square, smaller height (upsampled) and larger width (downsampled) than SIZE.
    images = rng.integers(0, 256, size=(2, 64, 160, 3), dtype=np.uint8)
    with torch.no_grad():
        want = ref(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0).numpy()

    model = inc.load_inception(st, input_size=SIZE)
    got = np.asarray(model.features(images))

    assert got.shape == (2, inc.FEATURE_DIM)
    scale = np.abs(want).max()
    assert scale > 1e-2 and np.std(want) > 1e-3 * scale  # features neither vanish nor collapse
    assert np.abs(got[0] - got[1]).max() > 1e-2 * scale  # two images differ
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale)


def test_prepare_images_matches_torch_interpolate():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(2, 37, 311, 3), dtype=np.uint8)
    t = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    want = 2 * F.interpolate(t, size=(299, 299), mode="bilinear", align_corners=False) - 1
    got = np.asarray(inc.prepare_images(images, 299))
    np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), rtol=0, atol=2e-6)
    same = np.asarray(inc.prepare_images(images[:, :, :37], None))
    np.testing.assert_allclose(same, images[:, :, :37] / 127.5 - 1.0, rtol=0, atol=1e-6)


def test_pth_loads_same_weights_as_safetensors(reference, tmp_path):
    _, st, pth = reference
    a = inc.state_dict(inc.load_inception(st, input_size=SIZE))
    b = inc.state_dict(inc.load_inception(pth, input_size=SIZE))
    converted = str(tmp_path / "converted.safetensors")
    inc.convert_pth(pth, converted)
    c = inc.state_dict(inc.load_inception(converted, input_size=SIZE))
    assert set(a) == set(b) == set(c) and len(a) == 94 * 5  # 94 conv + BatchNorm pairs
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
        np.testing.assert_array_equal(a[name], c[name])


def test_mismatched_file_lists_missing_and_unexpected(reference, tmp_path):
    _, st, _ = reference
    from safetensors.numpy import load_file
    sd = load_file(st)
    del sd["Mixed_6c.branch7x7dbl_3.bn.running_var"]
    sd["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
    sd["Mixed_7c.branch_pool.conv.weight"] = np.zeros((192, 2048, 3, 3), np.float32)
    bad = str(tmp_path / "bad.safetensors")
    safetensors.write(bad, sd)
    with pytest.raises(CheckpointMismatchError) as e:
        inc.load_inception(bad)
    msg = str(e.value)
    assert "Mixed_6c.branch7x7dbl_3.bn.running_var" in msg
    assert "AuxLogits.fc.weight" in msg
    assert "Mixed_7c.branch_pool.conv.weight" in msg and "(192, 2048, 3, 3)" in msg


def test_user_errors(tmp_path, monkeypatch):
    from unclip_jax.errors import UserError
    with pytest.raises(UserError, match="does not exist"):
        inc.load_inception(str(tmp_path / "nope.safetensors"))
    other = tmp_path / "weights.npz"
    other.write_bytes(b"x")
    with pytest.raises(UserError, match="Cannot tell the format"):
        inc.load_inception(str(other))
    pth = tmp_path / inc.PTH_NAME
    pth.write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="weights_only"):
        inc.load_inception(str(pth))
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # as if torch were absent
    with pytest.raises(UserError, match="needs torch"):
        inc.load_inception(str(pth))
    with pytest.raises(ValueError, match="at least 75"):
        inc.InceptionV3(input_size=64, rngs=__import__("flax").nnx.Rngs(0))
