"""loop: the scaffolding the training loops share, on a one-parameter model."""

import pytest
import torch

from instructcli import checkpoint, console, loop
from instructcli.config import TrainConfig
from instructcli.errors import InstructError
from instructcli.loop import NonFiniteGuard


def test_non_finite_guard_skips_and_aborts():
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=1.0)
    guard = NonFiniteGuard(limit=2)
    assert guard.ok(1, 0.5, 1.0, opt)
    p.grad = torch.ones(2)
    assert not guard.ok(2, float("nan"), 1.0, opt) and p.grad is None  # the bad step's gradient is dropped
    assert guard.ok(3, 0.4, 2.0, opt) and guard.in_a_row == 0
    assert not guard.ok(4, 0.4, float("inf"), opt)
    with pytest.raises(InstructError, match="2 non-finite steps in a row") as e:
        guard.ok(5, float("-inf"), 1.0, opt)
    assert e.value.exit_code == 1


def one_param():
    p = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([p], lr=0.5)
    return p, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))


def test_optimizer_step_applies_finite_steps_and_drops_the_others():
    p, opt, sched = one_param()
    guard = NonFiniteGuard()
    p.grad = torch.ones(1)
    assert loop.optimizer_step(guard, 1, 0.3, 1.0, opt, sched) == 0.5  # the rate the step used
    assert p.item() == pytest.approx(0.5) and p.grad is None
    p.grad = torch.ones(1)
    assert loop.optimizer_step(guard, 2, float("nan"), 1.0, opt, sched) is None
    assert p.item() == pytest.approx(0.5) and p.grad is None  # the bad gradient never reached the weight
    p.grad = torch.ones(1)
    assert loop.optimizer_step(guard, 3, 0.2, 1.0, opt, sched) == 0.25  # the schedule moved once, not twice
    assert p.item() == pytest.approx(0.25)


def test_schedule_counts_steps_from_epochs_or_max_steps():
    _, opt, _ = one_param()
    per_step, total, _ = loop.schedule(TrainConfig(batch_size=4, grad_accum=2, epochs=2.0), opt, 20)
    assert (per_step, total) == (8, 6)  # ceil(20 / 8) = 3 steps an epoch
    assert loop.schedule(TrainConfig(max_steps=5), opt, 20)[1] == 5


def test_checkpoint_or_stop_saves_on_schedule_and_stops_with_a_checkpoint(tmp_path):
    run = checkpoint.RunDir(str(tmp_path / "run"))
    run.create()
    p, opt, sched = one_param()
    metrics = console.Metrics(run.metrics_path)

    class Asked:  # loop.Interrupt's state
        requested, signum = False, None

    ask = Asked()
    for done in (1, 2, 3):
        loop.checkpoint_or_stop(run, done, 4, ask, 2, 5, torch.nn.Module(), opt, sched, {}, metrics)
    assert [c.name for c in run.checkpoints()] == ["step-2"]
    loop.checkpoint_or_stop(run, 4, 4, ask, 2, 5, torch.nn.Module(), opt, sched, {}, metrics)  # the end: no checkpoint
    assert [c.name for c in run.checkpoints()] == ["step-2"]
    ask.requested, ask.signum = True, 15  # SIGTERM during step 3 of a longer run
    with pytest.raises(loop.Stopped) as e:
        loop.checkpoint_or_stop(run, 3, 10, ask, 0, 5, torch.nn.Module(), opt, sched, {"x": 1}, metrics)
    assert [c.name for c in run.checkpoints()] == ["step-2", "step-3"] and e.value.signum == 15


def test_micro_batches_resume_at_the_halved_size():
    assert loop.MicroBatches(8, True, 1).size == 8
    assert loop.MicroBatches(8, True, 1, {"step": 3, "extra": {"micro_batch": 2}}).size == 2
