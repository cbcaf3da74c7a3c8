"""The one training iteration (deepsim.train.step.run_iteration): D's passes per iteration, and D on the reals
and the detached fakes as one pass over the 2B batch, equal to two passes with dropout off."""

import pytest
import torch

from deepsim.config import get_preset
from deepsim.losses import DeePSiMLoss
from deepsim.networks import Discriminator
from deepsim.train.factory import build_trainer
from deepsim.train.step import Fakes

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")
SIZE, BATCH = 40, 3  # 40: the smallest multiple of 8 the code's unpadded D takes (35); odd batch


def _trainer(order):
    config = get_preset("autoencoder-photos").replace(
        comparator="alexnet-random:conv1", batch_size=BATCH, image_size=SIZE, device="cpu", update_order=order
    )
    torch.manual_seed(0)
    return build_trainer(config, torch.device("cpu"))


@pytest.mark.parametrize("order,passes", [("code", 2), ("simultaneous", 2)])
def test_d_runs_twice_per_iteration(order, passes):
    trainer = _trainer(order)
    batch_sizes = []
    trainer.discriminator.register_forward_hook(lambda m, args, out: batch_sizes.append(out.shape[0]))
    trainer.step(torch.rand(BATCH, 3, SIZE, SIZE) * 2 - 1)
    assert len(batch_sizes) == passes, batch_sizes
    assert sorted(batch_sizes) == [BATCH, 2 * BATCH]  # [reals; detached fakes], then the fakes for G


@pytest.mark.parametrize("feature_dim", [None, 7])
def test_one_pass_over_both_halves_equals_two_passes(feature_dim):
    torch.manual_seed(0)
    d = Discriminator(first_stride=2, feature_dim=feature_dim, dropout=0.0)
    trainer = _trainer("code")
    trainer.discriminator = d
    target, fake = torch.rand(BATCH, 3, SIZE, SIZE), torch.rand(BATCH, 3, SIZE, SIZE, requires_grad=True)
    condition = None if feature_dim is None else torch.randn(BATCH, feature_dim)
    one = trainer.discriminator_loss(Fakes(target, condition, fake, {}))
    grads_one = torch.autograd.grad(one.total, list(d.parameters()))
    two = DeePSiMLoss.discriminator_loss(d(target, condition), d(fake.detach(), condition))
    grads_two = torch.autograd.grad(two.total, list(d.parameters()))
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_one, grads_two):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert not fake.grad_fn and fake.grad is None  # the fakes stay detached from D's loss
