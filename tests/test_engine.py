"""The shared training loop on a small synthetic task (a tiny CNN, seconds on a CPU)."""

import numpy as np
import pytest
import torch
from torch import nn

from rwft.core.config import load_config
from rwft.core.data import DatasetSplits, ImageSplit
from rwft.core.engine import evaluate_split, fit, predict


def _bright_vs_dark(n: int, seed: int) -> ImageSplit:
    """Class 1 images carry a brighter blob: learnable, but not from a single pixel."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = rng.integers(0, 120, (n, 16, 16)).astype(np.uint8)
    images[labels == 1, 4:12, 4:12] += 90
    return ImageSplit(images, labels.astype(np.int64))


def _splits() -> DatasetSplits:
    return DatasetSplits(_bright_vs_dark(256, 0), _bright_vs_dark(96, 1), _bright_vs_dark(96, 2),
                         ("normal", "pneumonia"), source="synthetic")


def _tiny_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))


def _cfg(*overrides):
    return load_config(overrides=["train.device=cpu", "train.batch_size=32", "train.lr=0.05",
                                  "data.augment=false", *overrides])


def test_fit_learns_and_reports_validation_metrics():
    torch.manual_seed(0)
    model, splits, cfg = _tiny_cnn(), _splits(), _cfg()
    before = evaluate_split(model, splits.test, cfg)
    result = fit(model, splits, cfg, epochs=4)
    after = evaluate_split(model, splits.test, cfg)
    # An untrained net can rank these images but not classify them at 0.5; a trained one can.
    assert after["accuracy"] >= 0.9 > before["accuracy"]
    assert after["auroc"] > 0.95 and after["loss"] < before["loss"] - 0.2
    assert result.num_examples == 256 and result.steps == 4 * 8
    assert len(result.history) == 4 and 0 <= result.val["auroc"] <= 1


def test_same_seed_gives_identical_weights():
    def run():
        torch.manual_seed(1)
        model = _tiny_cnn()
        fit(model, _splits(), _cfg("data.augment=true"), epochs=1)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(run(), run())


def test_max_steps_per_epoch_caps_the_work():
    result = fit(_tiny_cnn(), _splits(), _cfg("train.max_steps_per_epoch=3"), epochs=2)
    assert result.steps == 6
    assert result.num_examples == 3 * 32


def test_proximal_term_keeps_weights_near_the_global_model():
    def drift(mu):
        torch.manual_seed(2)
        model = _tiny_cnn()
        start = [p.detach().clone() for p in model.parameters()]
        fit(model, _splits(), _cfg(), epochs=1, proximal_mu=mu)
        return sum(float(torch.sum((p.detach() - s) ** 2)) for p, s in zip(model.parameters(), start))

    assert drift(10.0) < 0.5 * drift(0.0)


def test_select_best_restores_the_best_validation_epoch():
    torch.manual_seed(3)
    model = _tiny_cnn()
    result = fit(model, _splits(), _cfg(), epochs=3, select_best=True)
    best = max(h["auroc"] for h in result.history)
    assert result.val["auroc"] == pytest.approx(best)
    assert evaluate_split(model, _splits().val, _cfg())["auroc"] == pytest.approx(best)


def test_predict_returns_probabilities_for_every_image():
    probs = predict(_tiny_cnn(), _splits().test, _cfg())
    assert probs.shape == (96, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_a_model_with_broken_weights_is_refused_not_scored():
    # An unchecked x1000 federated update overflows the logits: scikit-learn then crashed with a
    # traceback (or a NaN AUROC was reported). rwft says what is wrong in one line instead.
    from rwft.core.errors import BrokenModelError

    torch.manual_seed(0)
    model, splits, cfg = _tiny_cnn(), _splits(), _cfg()
    with torch.no_grad():
        model[-1].weight.mul_(1e38).mul_(1e38)  # inf logits: softmax gives NaN
    with pytest.raises(BrokenModelError, match=r"NaN or infinite on 96 of 96 images.*update_checks"):
        evaluate_split(model, splits.test, cfg)
