"""Image encoders (ViT on our transformer, torchvision trunks) and the attention padding mask."""
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from vlp.encoders import PatchEncoder, TextEncoder, TorchvisionTrunk
from vlp.layers import BertConfig, Transformer, TransformerConfig


def _grads_everywhere(module: torch.nn.Module) -> bool:
    return all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_patch_encoder_shapes_and_backward():
    torch.manual_seed(0)
    enc = PatchEncoder(image_size=16, patch_size=4, width=16, layers=2, heads=2, dropout=0.1)
    out = enc(torch.randn(2, 3, 16, 16))
    assert out.x.shape == (2, 1 + 16, 16) and enc.width == 16
    assert out.mask.dtype == torch.bool and out.mask.all() and out.mask.shape == (2, 17)
    (out.x[:, 0] * torch.randn(2, 16)).sum().backward()   # from the CLS token alone: reaches every weight
    assert _grads_everywhere(enc)


def test_patch_encoder_bad_input():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        PatchEncoder(image_size=15, patch_size=4, width=8, layers=1, heads=2)
    enc = PatchEncoder(image_size=16, patch_size=4, width=8, layers=1, heads=2)
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\), got \(2, 3, 32, 32\)"):
        enc(torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("name, stem, tokens, width", [
    ("resnet18", "default", 1, 512),             # 32 px / 32 = 1x1
    ("resnet18", "small", 16, 512),              # 32 px / 8 = 4x4
    ("efficientnet_b0", "default", 1, 1280),
    ("mobilenet_v3_small", "default", 1, 576),
    ("regnet_x_400mf", "default", 1, 400),
])
def test_trunk_shapes_and_backward(name, stem, tokens, width):
    torch.manual_seed(0)
    trunk = TorchvisionTrunk(name, stem=stem)
    out = trunk(torch.randn(2, 3, 32, 32))
    assert trunk.width == width and out.x.shape == (2, tokens, width)
    assert out.mask.shape == (2, tokens) and out.mask.all()
    out.x.pow(2).mean().backward()
    assert all(p.grad is not None for p in trunk.parameters())


def test_trunk_matches_torchvision_and_weights_round_trip(tmp_path):
    """Weights saved from a torchvision model (head included) load; pooled tokens + its fc = its output."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=7).eval()
    for m in tv.modules():                       # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    torch.save({"state_dict": tv.state_dict()}, tmp_path / "w.pth")
    save_file({"module." + k: v for k, v in tv.state_dict().items()}, tmp_path / "w.safetensors")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = tv(x)
        for file in ("w.pth", "w.safetensors"):
            trunk = TorchvisionTrunk("resnet18", weights=str(tmp_path / file)).eval()
            tokens = trunk(x).x                  # (2, 2*2, 512)
            assert torch.allclose(tv.fc(tokens.mean(1)), expected, atol=1e-5), file


def test_trunk_weights_errors(tmp_path):
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\).*layer1\.2\."):
        TorchvisionTrunk("resnet18", weights=str(tmp_path / "r34.pth"))
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match=r"wrong shape.*conv1\.weight \(64, 3, 7, 7\) vs expected \(64, 3, 3, 3"):
        TorchvisionTrunk("resnet18", weights=str(tmp_path / "r18.pth"), stem="small")
    state = torchvision.models.resnet18().state_dict()
    del state["layer4.1.bn2.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"missing tensor\(s\).*layer4\.1\.bn2\.weight"):
        TorchvisionTrunk("resnet18", weights=str(tmp_path / "partial.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        TorchvisionTrunk("resnet18", weights=str(tmp_path / "nope.pth"))


def test_trunk_bad_names():
    with pytest.raises(ValueError, match="unsupported model 'vgg16'; supported families: ResNet"):
        TorchvisionTrunk("vgg16")
    with pytest.raises(ValueError, match="ResNet family only"):
        TorchvisionTrunk("efficientnet_b0", stem="small")
    with pytest.raises(ValueError, match="one of default, small, half, got 'tiny'"):
        TorchvisionTrunk("resnet18", stem="tiny")
    for stem, side in (("default", 2), ("half", 4), ("small", 8)):       # layer4 map of a 64 px image
        assert TorchvisionTrunk("resnet18", stem=stem).feature_map(torch.randn(1, 3, 64, 64)).shape[-1] == side
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\), got \(2, 1, 32, 32\)"):
        TorchvisionTrunk("resnet18")(torch.randn(2, 1, 32, 32))


@pytest.mark.parametrize("pre_ln", [False, True])
def test_padded_tokens_do_not_change_real_tokens(pre_ln):
    torch.manual_seed(0)
    tr = Transformer(TransformerConfig(width=16, layers=2, heads=4, pre_ln=pre_ln)).eval()
    real = torch.randn(1, 4, 16)
    padded = torch.cat([real, 100 * torch.randn(1, 3, 16)], dim=1)              # (1, 7, 16): 3 junk tokens
    mask = torch.tensor([[True] * 4 + [False] * 3])
    with torch.no_grad():
        alone = tr(real, torch.ones(1, 4, dtype=torch.bool))
        with_pad = tr(padded, mask)
        unmasked = tr(padded, torch.ones(1, 7, dtype=torch.bool))
    assert torch.allclose(with_pad[:, :4], alone, atol=1e-5)
    assert not torch.allclose(unmasked[:, :4], alone, atol=1e-3)              # the mask is what protects them


def test_text_encoder_batch_with_padding_equals_alone():
    torch.manual_seed(0)
    enc = TextEncoder(BertConfig(vocab_size=40, max_position=16,
                                 transformer=TransformerConfig(width=16, layers=2, heads=2))).eval()
    short, long = torch.tensor([[5, 6, 7]]), torch.tensor([[8, 9, 10, 11, 12, 13]])
    batch = torch.cat([torch.cat([short, torch.zeros(1, 3, dtype=torch.long)], 1), long])   # (2, 6)
    mask = torch.tensor([[True] * 3 + [False] * 3, [True] * 6])
    with torch.no_grad():
        together = enc(batch, mask).x
        alone = enc(short, torch.ones(1, 3, dtype=torch.bool)).x
    assert torch.allclose(together[0, :3], alone[0], atol=1e-5)
