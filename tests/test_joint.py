"""model.image_locked: a trained trunk beside a locked ImageNet trunk; and the timm trunks built from the config."""
import pytest
import torch

from vlp import config, systems
from vlp.models import build_image_tower


def _model_cfg(**sets):
    return config.load(None, [f"model.{k}={v}" for k, v in sets.items()]).model


def test_joint_tower_trains_only_its_own_trunk():
    torch.manual_seed(0)
    tower, pool = build_image_tower(_model_cfg(image_encoder="resnet18", image_locked="tf_efficientnet_lite0",
                                               image_locked_size=96))
    assert pool == "mean" and tower.width == 512 + 1280
    assert all(not p.requires_grad for p in tower.locked.parameters())
    assert all(p.requires_grad for p in tower.trained.parameters())
    tower.train()
    assert tower.trained.training and not tower.locked.training and not any(m.training for m in tower.locked.modules())
    images = torch.randn(4, 3, 64, 64)
    before = {k: v.clone() for k, v in tower.locked.state_dict().items()}
    out = tower(images)
    assert out.x.shape == (4, 1, 1792) and out.mask.all()
    out.x.square().mean().backward()
    assert all(p.grad is None for p in tower.locked.parameters())
    assert all(torch.equal(before[k], v) for k, v in tower.locked.state_dict().items())   # BN statistics too
    # the locked half is the locked trunk's own pooled output at its size
    resized = torch.nn.functional.interpolate(images, size=(96, 96), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.x[:, 0, 512:], tower.locked(resized).x.mean(1))


def test_timm_trunk_from_the_config_and_errors():
    cfg = _model_cfg(image_encoder="efficientnet_lite0", image_weights="imagenet", image_frozen_stages=2,
                     image_freeze_bn="true")
    tower, pool = build_image_tower(cfg)
    assert type(tower).__name__ == "TimmTrunk" and pool == "mean"
    assert any(p.requires_grad for p in tower.parameters()) and not all(p.requires_grad for p in tower.parameters())
    with pytest.raises(ValueError, match="are for timm trunks"):
        build_image_tower(_model_cfg(image_encoder="resnet18", image_frozen_stages=1))
    with pytest.raises(ValueError, match="not with image_encoder"):
        build_image_tower(_model_cfg(image_encoder="vit", image_locked="tf_efficientnet_lite0"))


def test_a_dual_encoder_with_a_joint_tower_saves_and_loads(tmp_path):
    """The locked trunk's weights travel in the checkpoint like any other (and load back equal)."""
    from safetensors.torch import load_file, save_file
    cfg = _model_cfg(image_locked="tf_efficientnet_lite0")
    a = systems.get("ernie-vil2").build_model(cfg, 100)
    save_file({k: v.contiguous() for k, v in a.state_dict().items()}, tmp_path / "m.safetensors")
    b = systems.get("ernie-vil2").build_model(cfg, 100)
    b.load_state_dict(load_file(tmp_path / "m.safetensors"))
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(a.eval().encode_image(x), b.eval().encode_image(x))


def test_precomputed_locked_features_equal_the_live_ones_and_train_the_same(emoji_tiny, tmp_path, monkeypatch):
    """LiT-style: the locked trunk's features of every training image once; a lookup by index gives exactly the
    live features of the whole image, and a short run with the cache matches one without it step for step
    when nothing is augmented."""
    import json

    from test_train import tiny_cfg
    from vlp.data.transforms import normalize
    from vlp.train import loop
    cfg = config.load(None, ["model.image_encoder=resnet18", "model.image_locked=tf_efficientnet_lite0",
                             "model.image_locked_size=32"]).model
    model = systems.get("ernie-vil2").build_model(cfg, 100).eval()
    images = (torch.rand(6, 3, 32, 32) * 255).to(torch.uint8)
    assert model.image.precompute(images, normalize) == 6
    x = normalize(images[[4, 0, 4]])
    torch.testing.assert_close(model.encode_image(x, torch.tensor([4, 0, 4])), model.encode_image(x))

    sets = {"model.image_encoder": '"resnet18"', "model.image_locked": '"tf_efficientnet_lite0"',
            "model.image_locked_size": 32, "data.augment": '"none"', "train.steps": 3}
    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    cached = losses(loop.train(tiny_cfg(emoji_tiny, tmp_path / "cached", **sets), progress=False))
    from vlp.encoders.joint import JointTrunk
    monkeypatch.setattr(JointTrunk, "precompute", lambda self, images, normalize, chunk=256: 0)   # no cache
    live = losses(loop.train(tiny_cfg(emoji_tiny, tmp_path / "live", **sets), progress=False))
    assert len(cached) == 3 and cached == pytest.approx(live, rel=1e-4)
