"""The one batched predictor: BatchNorm folding is exact up to float rounding, the caller's model
is never touched, and the measured batch size is remembered per model and device."""

from __future__ import annotations

import torch
from torch import nn

from bdaudit.core import predict as predict_mod
from bdaudit.core.predict import Predictor, evaluation_copy, fold_batchnorm, predict, search_copy

CPU = torch.device("cpu")


class Branchy(nn.Module):
    """conv1's output feeds both its BN and a skip: only conv2/bn2 may be folded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                  nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv1(x)
        b = torch.relu(self.bn1(a)) + a
        return self.head(torch.relu(self.bn2(self.conv2(b))))


class Untraceable(Branchy):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            x = x * 1.0
        return self.head(torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))))


def _with_stats(net: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen))
    return net.eval()


def _images(n: int = 96) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def _bn_count(net: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def test_folding_keeps_the_predictions_and_skips_a_shared_output() -> None:
    torch.manual_seed(0)
    net = _with_stats(Branchy())
    x = _images().float() / 255
    with torch.no_grad():
        reference = net(x)
    folded = evaluation_copy(net, CPU)
    assert _bn_count(folded) == 1  # bn1 stays: conv1's output also feeds the skip
    with torch.no_grad():
        out = folded(x)
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
    assert torch.equal(out.argmax(1), reference.argmax(1))


def test_untraceable_forward_falls_back_to_sequentials() -> None:
    torch.manual_seed(0)
    net = _with_stats(Untraceable())
    twin = evaluation_copy(net, CPU)
    assert _bn_count(twin) == 2  # only the BatchNorm1d inside the Sequential head is folded
    x = _images().float() / 255
    with torch.no_grad():
        torch.testing.assert_close(twin(x), net(x), rtol=1e-4, atol=1e-4)


def test_training_mode_batchnorm_is_not_folded() -> None:
    net = _with_stats(Branchy()).train()
    assert fold_batchnorm(net) == 0


def test_predictor_never_touches_the_input_model() -> None:
    torch.manual_seed(0)
    net = _with_stats(Branchy()).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    preds = predict(net, _images(), CPU, batch_size=32, transform=lambda x: x.flip(-1))
    assert net.training and all(m.training for m in net.modules())
    assert _bn_count(net) == 3
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        expected = net.eval()(_images().float().div(255).flip(-1)).argmax(1)
    assert torch.equal(preds, expected)


def test_search_copy_gives_the_same_outputs_and_input_gradients_in_pieces() -> None:
    torch.manual_seed(0)
    net = _with_stats(Branchy()).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    twin = search_copy(net, CPU, (8, 8))  # 100,000 positions / 64 per image: pieces of 1,562
    assert twin.most == 1562
    twin.most = 40  # 96 images -> three pieces of 32
    pieces = []
    original = twin.model.forward
    twin.model.forward = lambda x: pieces.append(len(x)) or original(x)
    x = (_images().float() / 255).requires_grad_(True)
    twin(x).logsumexp(1).sum().backward()
    assert pieces == [32, 32, 32]
    reference_x = x.detach().clone().requires_grad_(True)
    net.eval()(reference_x).logsumexp(1).sum().backward()
    torch.testing.assert_close(x.grad, reference_x.grad, rtol=1e-4, atol=1e-5)
    assert not any(p.requires_grad for p in twin.parameters())
    net.train()
    assert all(p.requires_grad for p in net.parameters()) and _bn_count(net) == 3
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_batch_size_is_measured_once_per_model_and_device(monkeypatch) -> None:
    monkeypatch.setattr(predict_mod, "_MEASURED", {})
    monkeypatch.setattr(predict_mod, "MEASURE_CPU", True)
    monkeypatch.setattr(predict_mod, "BATCH_LADDER", (8, 8, 16, 32))
    torch.manual_seed(0)
    net = _with_stats(Branchy())
    first = Predictor(net, CPU)
    labels = first.labels(_images(200), [None, lambda x: 1 - x])
    assert len(predict_mod._MEASURED) == 1
    chosen = next(iter(predict_mod._MEASURED.values()))
    assert chosen in (8, 16, 32)
    assert first.forwards == 400
    fixed = Predictor(net, CPU, batch_size=7).labels(_images(200), [None, lambda x: 1 - x])
    assert all(torch.equal(a, b) for a, b in zip(labels, fixed, strict=True))
    assert Predictor(net, CPU)._next_size(_images(4), 4) == (chosen, False)


def test_cpu_batch_size_is_fixed_not_timed(monkeypatch) -> None:
    # Timing-chosen sizes would tie CPU results to the machine's load: the CPU gets a fixed size.
    monkeypatch.setattr(predict_mod, "_MEASURED", {})
    predictor = Predictor(_with_stats(Branchy()), CPU)
    predictor.labels(_images(200))
    assert predict_mod._MEASURED == {} and predictor._trials == []
    assert predictor._next_size(_images(4), 4) == (predict_mod.CPU_BATCH, False)


def test_logits_match_the_model() -> None:
    torch.manual_seed(0)
    net = _with_stats(Branchy())
    with torch.no_grad():
        expected = net(_images().float() / 255)
    torch.testing.assert_close(Predictor(net, CPU, 40).logits(_images()), expected, rtol=1e-4, atol=1e-4)
