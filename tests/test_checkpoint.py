"""checkpoint: run dirs, checkpoints and resume checks."""

import pytest
import torch

from instructcli import checkpoint
from instructcli.errors import InstructError


def test_a_checkpoint_from_another_model_shape_is_refused_in_one_line(tmp_path):
    """An optimizer state that does not fit (e.g. written when one more parameter was trained) is an
    InstructError naming the checkpoint, not a raw ValueError."""

    def setup(n_params):
        net = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(n_params)])
        opt = torch.optim.AdamW(net.parameters())
        net(torch.ones(1, 2)).sum().backward()
        opt.step()
        return net, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    run = checkpoint.RunDir(str(tmp_path / "out"))
    run.create()
    net, opt, sch = setup(2)
    run.save_checkpoint(1, net, opt, sch, {}, 2)
    net1, opt1, sch1 = setup(2)
    for p in list(net1.parameters())[:2]:  # one parameter fewer in training now
        p.requires_grad_(False)
    opt1 = torch.optim.AdamW([p for p in net1.parameters() if p.requires_grad])
    resumed = checkpoint.RunDir(str(tmp_path / "out"), resume=True)
    with pytest.raises(InstructError, match="does not fit this model"):
        resumed.load_checkpoint(net1, opt1, sch1)


def test_resume_must_take_as_many_examples_per_step():
    checkpoint.check_resume({"examples_per_step": 8}, 8)
    with pytest.raises(InstructError, match="took 8 examples") as e:
        checkpoint.check_resume({"examples_per_step": 8}, 4)
    assert e.value.exit_code == 2


def test_epoch_order_is_a_function_of_seed_and_position():
    a, b = checkpoint.EpochOrder(5, 0), checkpoint.EpochOrder(5, 0)
    first = [a[k] for k in range(10)]
    assert sorted(first[:5]) == sorted(first[5:]) == list(range(5))  # each epoch a permutation
    assert [b[k] for k in range(9, -1, -1)] == first[::-1]  # drawn in any order, the same
