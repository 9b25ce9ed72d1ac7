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
