"""The training recipe (rwft.core.recipe): each ingredient does what its key promises.

Training runs on real PneumoniaMNIST at 28 px (a few hundred images, seconds per epoch).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight

from rwft.core import recipe
from rwft.core.config import load_config
from rwft.core.data import load_splits
from rwft.core.engine import Trainer, fit
from rwft.core.errors import ConfigError
from rwft.core.model import build_model

BASE = ["train.device=cpu", "data.image_size=28", "train.batch_size=64", "data.max_train_images=256",
        "train.lr=0.002", "data.augment=false"]


@pytest.fixture(scope="module")
def splits(pneumoniamnist_npz):
    return load_splits(load_config(overrides=[*BASE, f"data.root={pneumoniamnist_npz}"]))


def _cfg(*overrides):
    return load_config(overrides=[*BASE, *overrides])


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg.model, 2)


def test_defaults_are_the_plain_adamw_onecycle_loop():
    cfg = _cfg()
    model = _model(cfg)
    stage = recipe.build_optimisation(model, cfg.train, stage=recipe.FULL, steps_per_epoch=10, epochs=2)
    assert isinstance(stage.optimizer, torch.optim.AdamW) and len(stage.optimizer.param_groups) == 1
    assert stage.optimizer.param_groups[0]["weight_decay"] == cfg.train.weight_decay
    assert isinstance(stage.scheduler, torch.optim.lr_scheduler.OneCycleLR)
    assert stage.loss_fn.weight is None and stage.loss_fn.label_smoothing == 0.0
    assert recipe.first_stage(cfg.train) == recipe.FULL and recipe.build_ema(model, cfg.train) is None


def test_layer_decay_gives_each_layer_lr_times_decay_to_its_depth_below_the_head():
    decay, lr = 0.7, 0.002
    cfg = _cfg("train.layer_decay=0.7", "model.adapter=conv1x1", "model.pretrained=false", "train.schedule=constant")
    model = _model(cfg)
    optimizer = recipe.build_optimisation(model, cfg.train, stage=recipe.FULL, steps_per_epoch=4,
                                          epochs=1).optimizer
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    assert set(lr_of) == {id(p) for p in named.values()}  # every parameter optimised, once
    top = start = lr_of[id(named["head.weight"])]
    assert top == pytest.approx(lr)
    depth = {name: round(math.log(lr_of[id(p)] / top) / math.log(decay)) for name, p in named.items()}
    for name, p in named.items():
        assert lr_of[id(p)] == pytest.approx(start * decay ** depth[name])
    # timm's own layer order for EfficientNet: stem < blocks in order < head; adapter lowest.
    assert depth["adapter.weight"] == max(depth.values())
    assert depth["backbone.conv_stem.weight"] == max(depth.values()) - 1
    blocks = [depth[f"backbone.blocks.{i}.0.bn1.weight"] for i in range(7)]
    assert blocks == sorted(blocks, reverse=True) and len(set(blocks)) == 7
    assert depth["backbone.conv_head.weight"] == depth["backbone.blocks.6.0.bn1.weight"]  # timm merges them
    assert depth["head.bias"] == 0
    # timm's rule: 1-D parameters (biases, norms) get no weight decay.
    wd = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert wd[id(named["head.bias"])] == 0.0 and wd[id(named["head.weight"])] == cfg.train.weight_decay


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_warmup_rises_linearly_then_follows_the_schedule(schedule):
    cfg = _cfg(f"train.schedule={schedule}", "train.warmup_epochs=1", "train.lr=0.01")
    stage = recipe.build_optimisation(_model(cfg), cfg.train, stage=recipe.FULL, steps_per_epoch=5, epochs=4)
    lrs = []
    for _ in range(20):
        lrs.append(stage.optimizer.param_groups[0]["lr"])
        stage.optimizer.step()
        stage.scheduler.step()
    np.testing.assert_allclose(lrs[:5], [0.01 * (s + 1) / 5 for s in range(5)])
    after = [0.01 * (0.5 * (1 + math.cos(math.pi * (s - 5) / 15)) if schedule == "cosine" else 1.0)
             for s in range(5, 20)]
    np.testing.assert_allclose(lrs[5:], after, rtol=1e-6)


def test_onecycle_warmup_epochs_set_where_the_lr_peaks():
    def peak_step(*overrides):
        cfg = _cfg(*overrides)
        stage = recipe.build_optimisation(_model(cfg), cfg.train, stage=recipe.FULL, steps_per_epoch=10, epochs=4)
        lrs = []
        for _ in range(40):
            lrs.append(stage.optimizer.param_groups[0]["lr"])
            stage.optimizer.step()
            stage.scheduler.step()
        return int(np.argmax(lrs))

    assert peak_step() == 5  # rwft's original 15% of 40 steps (OneCycleLR peaks at step pct * total - 1)
    assert peak_step("train.warmup_epochs=2") == 19


def test_label_smoothing_is_torchs_and_changes_the_loss():
    logits, labels = torch.randn(16, 2, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 2
    smoothed = recipe.build_loss(_cfg("train.label_smoothing=0.1").train, None)(logits, labels)
    plain = recipe.build_loss(_cfg().train, None)(logits, labels)
    assert smoothed == pytest.approx(float(F.cross_entropy(logits, labels, label_smoothing=0.1)))
    assert abs(float(smoothed) - float(plain)) > 1e-3


def test_class_weights_are_sklearns_balanced_weights(splits):
    labels = splits.train.labels
    expected = compute_class_weight("balanced", classes=np.array([0, 1]), y=labels)
    np.testing.assert_allclose(recipe.balanced_class_weights(labels), expected)
    assert expected[0] > 1 > expected[1]  # PneumoniaMNIST: normal is the minority
    loss_fn = recipe.build_loss(_cfg("train.class_balance=weights").train, labels)
    logits = torch.randn(32, 2, generator=torch.Generator().manual_seed(1))
    targets = torch.as_tensor(labels[:32])
    weighted = F.cross_entropy(logits, targets, weight=torch.as_tensor(expected, dtype=torch.float32))
    assert float(loss_fn(logits, targets)) == pytest.approx(float(weighted))
    # A site without any normal image still gets one weight per logit.
    np.testing.assert_allclose(recipe.balanced_class_weights(np.ones(5, int)), [1.0, 1.0])


def test_balanced_sampler_draws_both_classes_equally(splits):
    train = splits.train
    assert np.mean(train.labels) > 0.7  # the data as it is: mostly pneumonia
    drawn = recipe.epoch_split(train, _cfg("train.class_balance=sampler").train, torch.Generator().manual_seed(0))
    assert len(drawn) == len(train) and abs(np.mean(drawn.labels) - 0.5) < 0.08
    assert recipe.epoch_split(train, _cfg().train, torch.Generator()) is train


def test_ema_weights_follow_timms_formula_and_are_what_fit_keeps(splits):
    decay = 0.8
    cfg = _cfg(f"train.ema_decay={decay}", "train.max_steps_per_epoch=3", "model.pretrained=false")
    model = _model(cfg)
    trainer = Trainer(model, cfg, steps_per_epoch=3, epochs=1, train_labels=splits.train.labels)
    expected = None
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        images = torch.rand(8, 1, 28, 28, generator=generator)
        trainer.train_step(images, torch.arange(8) % 2)
        raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
        # First update copies the weights; then ema = decay * ema + (1 - decay) * weights.
        expected = raw if expected is None else {
            k: decay * expected[k] + (1 - decay) * raw[k] if raw[k].is_floating_point() else raw[k] for k in raw}
    ema = trainer.ema.module.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(ema[key], value, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ema["head.weight"], model.state_dict()["head.weight"])

    # fit validates the EMA and hands back the EMA weights.
    model = _model(cfg, seed=1)
    captured = {}

    def on_epoch_end(epoch, trainer, val, is_best):
        captured["ema"] = {k: v.clone() for k, v in trainer.eval_model.state_dict().items()}
        captured["raw"] = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    fit(model, splits, cfg, epochs=1, on_epoch_end=on_epoch_end)
    assert not torch.equal(captured["ema"]["head.weight"], captured["raw"]["head.weight"])
    torch.testing.assert_close(model.state_dict()["head.weight"], captured["ema"]["head.weight"])


def test_lp_ft_trains_only_the_head_then_everything_at_a_lower_rate(splits):
    cfg = _cfg("train.lp_epochs=1", "train.ft_lr_scale=0.1", "train.schedule=constant", "train.max_steps_per_epoch=2")
    model = _model(cfg)
    snapshots, lrs, trainable = [{k: v.clone() for k, v in model.state_dict().items()}], [], []

    def on_epoch_end(epoch, trainer, val, is_best):
        snapshots.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainable.append(sum(p.numel() for p in trainer.parameters))

    fit(model, splits, cfg, epochs=2, on_epoch_end=on_epoch_end)
    before, probe, full = snapshots
    stem = "backbone.conv_stem.weight"
    assert torch.equal(before[stem], probe[stem]) and not torch.equal(probe[stem], full[stem])
    assert not torch.equal(before["head.weight"], probe["head.weight"])
    # BatchNorm statistics stay the pretrained ones while probing.
    assert torch.equal(before["backbone.bn1.running_mean"], probe["backbone.bn1.running_mean"])
    assert lrs == pytest.approx([0.002, 0.0002])
    assert trainable[0] == model.head.weight.numel() + model.head.bias.numel() < trainable[1]
    assert model.mode == "full" and all(p.requires_grad for p in model.parameters())


def test_a_resumed_lp_ft_run_continues_in_the_stage_it_was_in(splits):
    cfg = _cfg("train.lp_epochs=1", "train.ema_decay=0.9", "train.max_steps_per_epoch=2")
    first = Trainer(_model(cfg), cfg, steps_per_epoch=2, epochs=3)
    first.begin_epoch(1)
    first.train_epoch(splits.train, epoch_seed=0)
    state = first.state_dict()
    resumed = Trainer(_model(cfg, seed=5), cfg, steps_per_epoch=2, epochs=3)
    assert resumed.stage == recipe.PROBE
    resumed.load_state_dict(state)
    assert resumed.stage == recipe.FULL and resumed.optimizer.param_groups[0]["lr"] == pytest.approx(
        first.optimizer.param_groups[0]["lr"])
    torch.testing.assert_close(resumed.ema.module.state_dict()["head.weight"], first.ema.module.state_dict()["head.weight"])


@pytest.mark.parametrize("override", ["train.layer_decay=0", "train.ema_decay=1", "train.label_smoothing=1.5",
                                      "train.class_balance=oversample"])
def test_impossible_recipe_values_are_config_errors(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        cfg = _cfg(override)
        recipe.build_optimisation(_model(cfg), cfg.train, stage=recipe.FULL, steps_per_epoch=1, epochs=1)


def test_lp_ft_needs_a_full_model():
    with pytest.raises(ConfigError, match="model.mode=full"):
        _cfg("train.lp_epochs=1", "model.mode=probe")


def _augment_settings(**changes):
    still = {"data.augmentation.rotation": 0, "data.augmentation.scale": "[1.0,1.0]",
             "data.augmentation.translate": 0, "data.augmentation.brightness": 0, "data.augmentation.contrast": 0}
    still |= {f"data.augmentation.{k}": v for k, v in changes.items()}
    return load_config(overrides=[f"{k}={v}" for k, v in still.items()]).data.augmentation


def test_random_resized_crop_stays_inside_the_frame_unlike_the_default_zoom():
    from rwft.core.augment import augment_batch

    flat = torch.ones(64, 1, 32, 32)
    cropped = augment_batch(flat, torch.Generator().manual_seed(0), _augment_settings(crop_scale="[0.5,0.9]"))
    assert torch.allclose(cropped, flat)  # every crop lies inside the film: no black border
    zoomed = augment_batch(flat, torch.Generator().manual_seed(0))  # default: zoom out to 0.9 and shift
    assert (zoomed < 0.5).any()
    # A crop of area a shows the centre magnified by 1/sqrt(a).
    ramp = torch.linspace(0, 1, 64).expand(1, 1, 64, 64).contiguous()
    half = augment_batch(ramp, torch.Generator().manual_seed(0), _augment_settings(crop_scale="[0.25,0.25]"))
    slope = (half[0, 0, 32, 40] - half[0, 0, 32, 24]) / (ramp[0, 0, 32, 40] - ramp[0, 0, 32, 24])
    assert float(slope) == pytest.approx(0.5, abs=0.02)


def test_gamma_jitter_raises_each_image_to_its_own_power_within_the_range():
    from rwft.core.augment import augment_batch

    x = torch.linspace(0.05, 0.95, 16 * 16).view(1, 1, 16, 16).repeat(32, 1, 1, 1)
    out = augment_batch(x, torch.Generator().manual_seed(0), _augment_settings(gamma=0.5))
    exponent = (out.log() / x.log()).flatten(1)
    assert torch.allclose(exponent, exponent[:, :1].expand_as(exponent), atol=1e-3)  # one gamma per image
    gammas = exponent[:, 0]
    assert gammas.min() >= 1 / 1.5 - 1e-4 and gammas.max() <= 1.5 + 1e-4 and gammas.std() > 0.05


def test_flips_happen_only_when_asked_for():
    from rwft.core.augment import augment_batch

    ramp = (0.1 + 0.7 * torch.linspace(0.9, 0.2, 32)).expand(16, 1, 32, 32).contiguous()  # left side brighter
    kept = augment_batch(ramp, torch.Generator().manual_seed(0), _augment_settings())
    flipped = augment_batch(ramp, torch.Generator().manual_seed(0), _augment_settings(hflip=1.0))
    assert torch.all(kept[..., :16].mean(dim=(1, 2, 3)) > kept[..., 16:].mean(dim=(1, 2, 3)))
    assert torch.all(flipped[..., :16].mean(dim=(1, 2, 3)) < flipped[..., 16:].mean(dim=(1, 2, 3)))
    assert load_config().data.augmentation.hflip == 0.0
