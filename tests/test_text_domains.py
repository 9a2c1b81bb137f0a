"""Text by domain: the main text and the news text split apart, calibration drawn from both, fidelity measured and
gated on each (fast tier: no pipeline)."""

from __future__ import annotations

import hashlib
import sys

import numpy as np
import pytest

from antinet_npu import AntinetError
from antinet_npu.build import corpus
from antinet_npu.config import GateConfig, TextConfig
from antinet_npu.measure import fidelity

TEXT = TextConfig(domains={"news": corpus.BUILTIN_NEWS})


class _Chars:
    """A tokenizer stand-in: one token per character (windows only need ids)."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + ord(c) % 200 for c in text]}


def test_news_is_prose_and_its_held_out_documents_are_never_calibration_text():
    docs = corpus.load_documents(corpus.BUILTIN_NEWS)
    assert len(docs) == 300 and docs[0].text.startswith("Hundreds of people have been forced to vacate their homes")
    calib, held_out = corpus.domain_documents(TEXT, "calib"), corpus.domain_documents(TEXT, "eval")
    assert list(calib) == list(held_out) == ["main", "news"]
    for domain in calib:
        assert not {d.id for d in calib[domain]} & {d.id for d in held_out[domain]}
    # the news text trains nothing: all of it is calibration or evaluation, in the ratio of the two fractions
    assert len(calib["news"]) + len(held_out["news"]) == 300 and 100 < len(held_out["news"]) < 200
    # the main text splits exactly as before domains existed
    assert [d.id for d in held_out["main"]] == [d.id for d in corpus.split_documents(TEXT)["eval"]]


def test_calibration_draws_from_every_domain_in_turn():
    tokenizer = _Chars()
    per_domain = {d: corpus.windows(tokenizer, docs, 64, 4, d) for d, docs in corpus.domain_documents(TEXT,
                                                                                                         "calib").items()}
    mixed = corpus.calibration_windows(tokenizer, TEXT, 64, 7)  # 4 from the main text, 3 from the news
    assert mixed.shape == (7, 64)
    expected = [per_domain["main"][0], per_domain["news"][0], per_domain["main"][1], per_domain["news"][1],
                per_domain["main"][2], per_domain["news"][2], per_domain["main"][3]]
    assert all((a == b).all() for a, b in zip(mixed, expected))
    held_out = corpus.evaluation_windows(tokenizer, TEXT, 64, 3)
    assert {d: w.shape for d, w in held_out.items()} == {"main": (3, 64), "news": (3, 64)}
    assert corpus.calibration_windows(tokenizer, TextConfig(), 64, 5).shape == (5, 64)  # one domain: as before


def test_a_missing_or_damaged_news_text_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    text = corpus.RegistryText("builtin:x", "pkg", "1.0", "data/x.txt", hashlib.sha256(b"right").hexdigest())
    with pytest.raises(AntinetError, match=r"the builtin:x text is not installed .*run `make install` or "
                                           r"`antinet-npu fetch-text`"):
        text.read()
    text.path.parent.mkdir(parents=True)
    text.path.write_bytes(b"wrong")
    with pytest.raises(AntinetError, match="is damaged .*delete it and run `antinet-npu fetch-text`"):
        text.read()
    text.path.write_bytes(b"right")
    assert text.read() == "right"


def test_bad_domain_names_are_refused():
    for name in ("main", "bad name", ""):
        with pytest.raises(AntinetError, match="not a usable domain name"):
            TextConfig(domains={name: corpus.BUILTIN_NEWS}).check()


def test_fidelity_is_reported_and_gated_per_domain():
    rng = np.random.default_rng(0)
    meter = fidelity.DomainMeter()
    ids = rng.integers(0, 50, (1, 16))
    for _ in range(3):
        ref = rng.normal(size=(1, 16, 50))
        meter.add("main", ref, ref, ids)  # identical on the main text
        meter.add("news", ref, ref + rng.normal(scale=3.0, size=ref.shape), ids)  # far off on the news
    meter.add_greedy("main", [[1, 2, 3]], [[1, 2, 3]])
    meter.add_greedy("news", [[1, 2, 3]], [[1, 5, 6]])
    result = meter.result()
    assert result["domains"]["main"]["top1_agreement"] == 1.0 and result["domains"]["main"]["gen_agreement"] == 1.0
    assert result["domains"]["news"]["top1_agreement"] < 0.9 and result["domains"]["news"]["gen_agreement"] == 1 / 3
    assert result["positions"] == 96 and result["gen_agreement"] == 4 / 6  # the headline: every domain's windows
    assert result["top1_agreement"] == pytest.approx((48 + 48 * result["domains"]["news"]["top1_agreement"]) / 96)
    assert "top1_ci_low" in result["domains"]["news"]
    violations = fidelity.domain_violations("int8", result, GateConfig(min_top1=0.9))
    assert len(violations) == 1 and violations[0].startswith("int8 on news: top1_agreement")
