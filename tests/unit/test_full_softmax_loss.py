import torch
import torch.nn.functional as F

from llmrec.training.losses import FullSoftmaxLoss


def reference_loss(users, items, bias, targets, temperature):
    total = 0.0
    for user, target in zip(users, targets):
        logits = torch.stack([user @ item / temperature + b for item, b in zip(items, bias)])
        total = total - torch.log_softmax(logits, dim=0)[target]
    return total / len(users)


def test_loss_and_gradients_match_an_explicit_reference():
    torch.manual_seed(0)
    users = F.normalize(torch.randn(4, 8), dim=-1).requires_grad_()
    items = F.normalize(torch.randn(10, 8), dim=-1).requires_grad_()
    bias = torch.randn(10, requires_grad=True)
    targets = torch.tensor([0, 3, 3, 9])
    loss = FullSoftmaxLoss(0.05)(users, items, bias, targets)
    expected = reference_loss(users, items, bias, targets, 0.05)
    assert torch.allclose(loss, expected, atol=1e-5)
    grads = torch.autograd.grad(loss, (users, items, bias))
    expected_grads = torch.autograd.grad(expected, (users, items, bias))
    for got, want in zip(grads, expected_grads):
        assert torch.allclose(got, want, atol=1e-4)


def test_bias_alone_can_express_popularity():
    users = torch.zeros(3, 4)
    items = torch.zeros(5, 4)
    bias = torch.tensor([5.0, 0, 0, 0, 0])
    loss = FullSoftmaxLoss()
    assert loss(users, items, bias, torch.tensor([0, 0, 0])) < loss(users, items, bias, torch.tensor([1, 1, 1]))
