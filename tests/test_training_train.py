"""The training loop's pieces (optimisers, schedules), its per-epoch record, and its checkpoints."""

import re
from dataclasses import asdict

import pytest
import torch

from training import models
from training.config import TrainConfig
from training.train import make_optimizer, make_schedule, train


@pytest.mark.parametrize(
    "name, kind", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)]
)
def test_optimizer_is_built_as_configured(name, kind):
    cfg = TrainConfig(optimizer=name, lr=0.01, weight_decay=1e-4, momentum=0.8, amsgrad=name != "sgd")
    opt = make_optimizer(models.build("keras"), cfg)
    group = opt.param_groups[0]
    assert type(opt) is kind and (group["lr"], group["weight_decay"]) == (0.01, 1e-4)
    if name == "sgd":
        assert group["nesterov"] and group["momentum"] == 0.8
    else:
        assert group["amsgrad"]


def lrs_over(cfg: TrainConfig, steps: int, val_loss: float | None = None) -> list[float]:
    """The learning rate at each of `steps` optimizer steps (or plateau epochs, fed `val_loss`)."""
    opt = make_optimizer(models.build("keras"), cfg)
    schedule = make_schedule(opt, cfg, steps_per_epoch=steps // cfg.epochs)
    seen = []
    for _ in range(steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        if val_loss is not None:
            schedule.step(val_loss)
        elif schedule is not None:
            schedule.step()
    return seen


def test_onecycle_warms_up_to_the_peak_then_anneals():
    lrs = lrs_over(TrainConfig(schedule="onecycle", lr=0.01, epochs=2), steps=100)
    peak = lrs.index(max(lrs))
    assert lrs[0] == pytest.approx(0.01 / 25) and max(lrs) == pytest.approx(0.01, rel=1e-3)
    assert 20 <= peak <= 40  # 30 % of the steps warm up
    assert lrs[-1] < 1e-5 and all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1 :], strict=False))


def test_plateau_halves_the_lr_after_four_epochs_without_improvement():
    lrs = lrs_over(TrainConfig(schedule="plateau", lr=0.01, epochs=6), steps=6, val_loss=1.0)
    assert lrs == [0.01] * 5 + [0.005]


def test_no_schedule_keeps_the_lr():
    assert lrs_over(TrainConfig(schedule="none", lr=0.01, epochs=2), steps=10) == [0.01] * 10


def test_each_epoch_reports_its_own_time(mnist):
    lines: list[str] = []
    cfg = TrainConfig(arch="keras", epochs=3, train_limit=1000, val_size=100, schedule="none")
    result = train(cfg, mnist, log=lines.append)
    seconds = result.history.epoch_seconds
    assert len(seconds) == 3 and all(s > 0 for s in seconds)
    # each epoch's own time, not the time since the start (each rounded to 0.01 s, hence the allowance)
    assert sum(seconds) <= result.wall_time + 0.005 * len(seconds)
    printed = [float(m) for m in re.findall(r"^epoch \d/3: .*\((\d+\.\d)s\)$", "\n".join(lines), re.M)]
    assert printed == pytest.approx(seconds, abs=0.06)


def test_no_validation_split_trains_on_every_digit_and_plots_train_only(mnist, tmp_path):
    from training import reports

    lines: list[str] = []
    cfg = TrainConfig(arch="keras", epochs=2, train_limit=1000, val_size=0, schedule="none")
    result = train(cfg, mnist, log=lines.append)
    history = result.history
    assert len(history.train_loss) == 2 and history.val_loss == [] and history.val_acc == []
    assert not any("val" in line for line in lines if line.startswith("epoch"))
    reports.plot_curves(tmp_path, asdict(history))
    assert (tmp_path / "curves.png").stat().st_size > 0
