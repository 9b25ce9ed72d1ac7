import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def emoji_tiny(tmp_path_factory):
    """A small real emoji dataset (both styles, both languages), built once per test session."""
    from vlp.data.emoji import build_emoji
    out = tmp_path_factory.mktemp("emoji") / "emoji"
    build_emoji(out, size=32, limit=80, progress=False)
    return out / "dataset.json"


@pytest.fixture(scope="session")
def regions_tiny(emoji_tiny, tmp_path_factory):
    """A region store for every image of `emoji_tiny`: 1-3 boxes per image, 16-d features, 5 classes."""
    from vlp.data.formats import read_records
    from vlp.data.regions import RegionStore
    records, _ = read_records(emoji_tiny)
    g = torch.Generator().manual_seed(0)

    def items():
        for r in records:
            k = int(torch.randint(1, 4, (1,), generator=g))
            xy = torch.rand(k, 2, generator=g) * 16
            yield {"image_id": r.image_id, "image_w": 32, "image_h": 32, "features": torch.rand(k, 16, generator=g),
                   "boxes": torch.cat([xy, xy + 8 + torch.rand(k, 2, generator=g) * 8], 1),
                   "cls_prob": torch.softmax(torch.randn(k, 5, generator=g), -1)}
    return RegionStore.write(tmp_path_factory.mktemp("regions") / "store", items(),
                             class_names=[f"c{i}" for i in range(5)]).path
