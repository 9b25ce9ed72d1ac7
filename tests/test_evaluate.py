"""Retrieval evaluation protocol: per-style galleries, per language, image->image, groups (`by`)."""
import hashlib

import pytest
import torch
import torch.nn.functional as F

from vlp.data.formats import SkipReport, read_records
from vlp.data.pairs import decode_images
from vlp.data.transforms import normalize
from vlp.eval.retrieval import evaluate, format_table


class _Tok:
    """Each caption is one token: its row in a table."""
    def __init__(self, texts):
        self.row = {t: i for i, t in enumerate(dict.fromkeys(texts))}

    def encode(self, texts, max_len):
        ids = torch.tensor([[self.row[t]] for t in texts])
        return ids, torch.ones_like(ids, dtype=torch.bool)

    def unk_rate(self, texts):
        return 0.0


class _Oracle(torch.nn.Module):
    """A model that knows each image's emoji (by its pixels) and each caption's emoji; images whose
    first tag is `blind` are all embedded on one extra axis no caption uses, so they are never found."""
    def __init__(self, records, images, tok, blind):
        super().__init__()
        hexes = sorted({r.meta["hex"] for r in records})
        self.dim, code = len(hexes) + 1, {h: i for i, h in enumerate(hexes)}
        self.image_code = {}
        for r, img in zip(records, normalize(images)):
            wrong = r.tags and r.tags[0] == blind
            self.image_code[self._key(img)] = len(hexes) if wrong else code[r.meta["hex"]]
        self.text_code = torch.zeros(len(tok.row), dtype=torch.long)
        for r in records:
            for c in r.captions:
                self.text_code[tok.row[c]] = code[r.meta["hex"]]

    @staticmethod
    def _key(img):
        return hashlib.md5(img.numpy().tobytes()).hexdigest()

    def encode_image(self, images):
        codes = torch.tensor([self.image_code[self._key(x)] for x in images])
        return F.one_hot(codes, self.dim).float()

    def encode_text(self, ids, mask):
        return F.one_hot(self.text_code[ids[:, 0]], self.dim).float()


@pytest.fixture(scope="module")
def setup(emoji_tiny):
    records, _ = read_records(emoji_tiny)
    kept, images = decode_images(records, 32, SkipReport(), progress=False)
    keys = [hashlib.md5(x.numpy().tobytes()).hexdigest() for x in normalize(images)]
    assert len(set(keys)) == len(keys), "the fixture has two identical images"
    tok = _Tok([c for r in kept for c in r.captions])
    return kept, images, tok


def test_oracle_scores_100_and_groups_by_tag(setup):
    kept, images, tok = setup
    tags = sorted({r.tags[0] for r in kept if r.tags})
    blind = tags[0]
    model = _Oracle(kept, images, tok, blind)
    res = evaluate(model, tok, kept, 32, 8, progress=False, by="tag")
    assert set(res["styles"]) == {"openmoji", "twemoji"} and res["protocol"] == "per-style"
    by = res["by_tag"]
    assert by[blind]["en"]["t2i_r1"] == 0.0 and by[blind]["zh"]["t2i_r1"] == 0.0
    for tag in tags[1:]:
        assert by[tag]["en"]["t2i_r1"] == 100.0 and by[tag]["zh"]["t2i_r1"] == 100.0
    n_blind = sum(1 for r in kept if r.tags and r.tags[0] == blind)
    assert sum(lg["n_texts"] for g in by.values() for lg in g.values()) == sum(len(r.captions) for r in kept)
    # overall text->image: only the blind images are missed; per style, then averaged
    assert res["en"]["t2i_r1"] == pytest.approx(100.0 * (1 - n_blind / len(kept)))
    # image->image across styles: a blind query ties with every blind image of the gallery (a miss
    # when there are several: ties count against), every other query finds its twin
    n_blind_emoji = n_blind // 2
    assert res["i2i_r1"] == pytest.approx(100.0 * (1 - n_blind_emoji / (len(kept) // 2)) if n_blind_emoji > 1 else 100.0)
    assert "text->image R@1 by tag" in format_table(res)


def test_by_unknown_field_is_a_clear_error(setup):
    kept, images, tok = setup
    with pytest.raises(ValueError, match="no evaluated image has a 'colour' value"):
        evaluate(_Oracle(kept, images, tok, blind=None), tok, kept, 32, 8, progress=False, by="colour")


def test_lang_restricts_captions(setup):
    kept, images, tok = setup
    res = evaluate(_Oracle(kept, images, tok, blind=None), tok, kept, 32, 8, progress=False, lang="zh")
    assert res["n_texts"] == sum(lg == "zh" for r in kept for lg in r.langs)
    assert res["t2i_r1"] == 100.0 and res["i2t_r1"] == 100.0 and res["i2i_r1"] == 100.0
