"""fxprune.finetune: training raises accuracy, is deterministic per seed, takes the right number of
steps, follows its lr schedule, keeps weight decay off BN/bias parameters, distils from a teacher
without touching it, stops on request, evaluates and recalibrates BN correctly, and works on the
GraphModules fxprune.compile returns. Tiny synthetic data and nets: the whole file runs in seconds."""
import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.errors import ConfigError
from fxprune.training.finetune import FinetuneConfig, distillation_loss, evaluate, finetune, lr_at, make_optimizer, recalibrate_bn


# ------------------------------------------------------------------------------------------------
# Synthetic data and models
# ------------------------------------------------------------------------------------------------

def blobs(n: int, seed: int, signal: float = 1.0):
    """2-class Gaussian blobs as 3x8x8 images: class c is noise + (+/-) signal * a fixed pattern."""
    pattern = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 3, 8, 8, generator=g) + signal * (2 * y - 1).float().view(-1, 1, 1, 1) * pattern
    return x, y


class Loader:
    """A minimal loader: fixed batches, reshuffled per epoch from set_epoch (deterministically)."""

    def __init__(self, x, y, batch_size, shuffle=True):
        self.x, self.y, self.bs, self.shuffle = x, y, batch_size, shuffle
        self.epochs_set = []
        self.batches_fetched = 0
        self.order = torch.arange(len(x))

    def set_epoch(self, epoch):
        self.epochs_set.append(epoch)
        if self.shuffle:
            self.order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(100 + epoch))

    def __len__(self):
        return math.ceil(len(self.x) / self.bs)

    def __iter__(self):
        for i in range(0, len(self.x), self.bs):
            idx = self.order[i:i + self.bs]
            self.batches_fetched += 1
            yield self.x[idx], self.y[idx]


def tiny_net(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(16, 2))


@pytest.fixture(scope="module")
def data():
    x, y = blobs(256, seed=1)
    xe, ye = blobs(256, seed=2)
    return x, y, xe, ye


def state_equal(a, b) -> bool:
    """Identical state_dicts (modules or state_dicts), buffers such as BN running stats included."""
    sa = a.state_dict() if isinstance(a, nn.Module) else a
    sb = b.state_dict() if isinstance(b, nn.Module) else b
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------------
# Training works
# ------------------------------------------------------------------------------------------------

def test_finetune_raises_accuracy_from_a_damaged_model_and_ends_in_eval_mode(data, caplog):
    x, y, xe, ye = data
    net = tiny_net()
    with torch.no_grad():  # damaged: the classifier is wiped, every prediction ties -> class 0, 50 %
        net[-1].weight.zero_()
        net[-1].bias.zero_()
    eval_loader = Loader(xe, ye, 64, shuffle=False)
    before = evaluate(net, eval_loader)
    assert before["top1"] == pytest.approx(0.5)

    with caplog.at_level(logging.INFO, logger="fxprune"):
        history = finetune(net, Loader(x, y, 32), FinetuneConfig(epochs=4, lr=0.1, log_every=4),
                           eval_loader=eval_loader)
    after = evaluate(net, eval_loader)
    assert after["top1"] >= 0.9, (before, after, history["eval_top1"])
    assert not net.training and not any(m.training for m in net.modules())
    assert all(p.grad is None for p in net.parameters()), "gradients are freed at the end"
    # History: per-epoch records, eval after each epoch, the last equals evaluate() now.
    assert history["steps"] == history["total_steps"] == 32 and len(history["epochs"]) == 4
    assert history["eval_top1"][-1] == pytest.approx(after["top1"])
    assert history["train_acc"][-1] > history["train_acc"][0] or history["train_acc"][0] > 0.9
    assert len(history["lr"]) == 32 and history["lr_summary"]["max"] == pytest.approx(0.1)
    assert history["images"] == 4 * 256 and history["seconds"] > 0
    # Progress lines: step lines with loss/acc/lr/throughput, and per-epoch eval lines.
    text = caplog.text
    assert "step 4/32" in text and "img/s" in text and "lr " in text and "acc " in text
    assert "eval top1" in text


def test_same_seed_gives_identical_weights_and_different_seed_different(data):
    x, y, _, _ = data
    # DataLoader shuffling and dropout both draw from torch's global RNG, which finetune seeds.
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:128], y[:128]), batch_size=32, shuffle=True)
    base = tiny_net(dropout=0.5)
    cfg = FinetuneConfig(epochs=2, lr=0.05, seed=7)
    runs = []
    for seed in (7, 7, 8):
        m = copy.deepcopy(base)
        torch.manual_seed(999 + len(runs))  # the caller's RNG state must not matter
        rng_before = torch.get_rng_state()
        finetune(m, loader, FinetuneConfig(**{**cfg.__dict__, "seed": seed}))
        assert torch.equal(torch.get_rng_state(), rng_before), "finetune changed the caller's RNG state"
        runs.append(m)
    assert state_equal(runs[0], runs[1])
    assert not state_equal(runs[0], runs[2])
    assert not state_equal(runs[0], base)


@pytest.mark.parametrize("epochs, expected_steps, expected_epochs", [(0.5, 4, [0]), (2.25, 18, [0, 1, 2]), (1, 8, [0])])
def test_fractional_epochs_take_round_epochs_times_len_steps(data, epochs, expected_steps, expected_epochs):
    x, y, _, _ = data
    loader = Loader(x, y, 32)  # 8 batches per epoch
    calls = []
    history = finetune(tiny_net(), loader, FinetuneConfig(epochs=epochs, lr=0.01),
                       callback=lambda step, model, loss: calls.append(step))
    assert history["steps"] == expected_steps == len(history["lr"])
    assert calls == list(range(1, expected_steps + 1))
    assert loader.epochs_set == expected_epochs  # set_epoch(e) before each (partial) epoch
    assert loader.batches_fetched == expected_steps  # no batch fetched and thrown away
    assert sum(e["steps"] for e in history["epochs"]) == expected_steps


def test_cosine_schedule_warms_up_then_decays_to_near_zero(data):
    cfg = FinetuneConfig(lr=0.1, warmup_steps=5, schedule="cosine")
    lrs = [lr_at(s, 40, cfg) for s in range(40)]
    assert lrs[:5] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])  # linear ramp up, never 0
    assert lrs[5] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:])), "cosine part must not increase"
    assert 0 < lrs[-1] < 0.01 * 0.1
    const = [lr_at(s, 40, FinetuneConfig(lr=0.1, warmup_steps=2, schedule="constant")) for s in range(40)]
    assert const[:2] == pytest.approx([0.05, 0.1]) and all(v == 0.1 for v in const[1:])
    # finetune applies it per step and records it.
    x, y, _, _ = data
    history = finetune(tiny_net(), Loader(x, y, 32), FinetuneConfig(epochs=5, lr=0.1, warmup_steps=5))
    assert history["lr"] == pytest.approx([lr_at(s, 40, cfg) for s in range(40)])
    assert history["lr_summary"]["last"] < 1e-3


def test_weight_decay_not_applied_to_bn_and_bias_params():
    net = tiny_net()
    net[0].weight.requires_grad_(False)  # frozen parameters are not optimised at all
    opt = make_optimizer(net, FinetuneConfig(weight_decay=1e-3))
    assert isinstance(opt, torch.optim.SGD)
    assert all(g["momentum"] == 0.9 and g["nesterov"] for g in opt.param_groups)
    names = {id(p): n for n, p in net.named_parameters()}
    by_decay = {g["weight_decay"]: sorted(names[id(p)] for p in g["params"]) for g in opt.param_groups}
    assert by_decay == {1e-3: ["3.weight", "9.weight"],
                        0.0: ["0.bias", "1.bias", "1.weight", "3.bias", "4.bias", "4.weight", "9.bias"]}
    adamw = make_optimizer(net, FinetuneConfig(optimizer="adamw", weight_decay=0.05))
    assert isinstance(adamw, torch.optim.AdamW)
    assert sorted(g["weight_decay"] for g in adamw.param_groups) == [0.0, 0.05]
    # Behaviour, not just bookkeeping: with zero gradients only decay moves a weight.
    lin = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    before = copy.deepcopy(lin.state_dict())
    opt = make_optimizer(lin, FinetuneConfig(weight_decay=0.1, lr=1.0, momentum=0.0))
    for p in lin.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = lin.state_dict()
    assert not torch.equal(after["0.weight"], before["0.weight"])
    for k in ("0.bias", "1.weight", "1.bias"):
        assert torch.equal(after[k], before[k]), k


def test_distillation_moves_student_to_teacher_and_leaves_teacher_untouched(data):
    x, y, _, _ = data
    # A teacher whose outputs depend on the input: briefly trained on the real labels.
    teacher = tiny_net(seed=5, dropout=0.3)
    finetune(teacher, Loader(x, y, 32), FinetuneConfig(epochs=2, lr=0.05))
    teacher.train()  # given in train mode: finetune must still run it in eval mode (BN stats fixed)
    teacher_state = copy.deepcopy(teacher.state_dict())
    student = tiny_net(seed=6)

    def kl_to_teacher():
        teacher.eval(), student.eval()
        with torch.no_grad():
            return distillation_loss(student(x), teacher(x), 1.0).item()

    kl_before = kl_to_teacher()
    teacher.train()
    # y is deliberately random: with alpha=1 the labels must not matter.
    y_rand = torch.randint(0, 2, y.shape, generator=torch.Generator().manual_seed(3))
    finetune(student, Loader(x, y_rand, 32), FinetuneConfig(epochs=4, lr=0.05, distill_alpha=1.0, distill_temperature=1.0),
             teacher=teacher)
    assert teacher.training, "the teacher's train/eval mode must be restored"
    assert state_equal(teacher, teacher_state), "the teacher changed"
    assert all(p.grad is None for p in teacher.parameters())
    kl_after = kl_to_teacher()
    assert kl_after < 0.3 * kl_before, (kl_before, kl_after)
    # It learnt the task from the teacher alone (the labels it saw were noise).
    assert evaluate(student, [(x, y)])["top1"] > 0.8


def test_student_sharing_storage_with_the_teacher_does_not_write_into_it(data):
    """A pruned model may alias the dense model's unpruned tensors; distilling from that dense model
    must still leave it unchanged (finetune gives the student its own copies)."""
    x, y, _, _ = data
    teacher = tiny_net(seed=1).eval()
    student = tiny_net(seed=2)
    with torch.no_grad():
        student[-1].weight.data = teacher[-1].weight.data  # same storage, as fxprune's kept tensors can be
        student[1].running_mean.data = teacher[1].running_mean.data
    teacher_state = copy.deepcopy(teacher.state_dict())
    weight_param = student[-1].weight
    finetune(student, Loader(x, y, 32), FinetuneConfig(epochs=0.5, lr=0.05, distill_alpha=0.5), teacher=teacher)
    assert state_equal(teacher, teacher_state)
    assert student[-1].weight is weight_param and not torch.equal(weight_param, teacher[-1].weight)


def test_distillation_loss_formula():
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    T = 3.0
    p = F.softmax(t / T, dim=1)
    expected = (p * (p.log() - F.log_softmax(s / T, dim=1))).sum(1).mean() * T * T
    assert distillation_loss(s, t, T).item() == pytest.approx(expected.item(), rel=1e-5)
    assert distillation_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-6)


def test_callback_stop_ends_training_early(data):
    x, y, _, _ = data
    seen = []

    def callback(step, model, loss):
        assert model.training and isinstance(loss, float) and math.isfinite(loss)
        seen.append(step)
        return "stop" if step == 3 else None

    net = tiny_net()
    history = finetune(net, Loader(x, y, 32), FinetuneConfig(epochs=5), callback=callback)
    assert seen == [1, 2, 3]
    assert history["steps"] == 3 and history["stopped_early"] and history["total_steps"] == 40
    assert len(history["epochs"]) == 1 and history["epochs"][0]["steps"] == 3
    assert not net.training


def test_evaluate_on_a_hand_made_case():
    class Identity(nn.Module):  # the "logits" are the inputs themselves
        def forward(self, x):
            return x

    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0], [5.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 1, 0])  # sample 2 wrong: 4/5 correct
    batches = [(logits[:4], labels[:4]), (logits[4:], labels[4:])]  # uneven batches: per-sample average
    model = Identity().train()
    result = evaluate(model, batches)
    assert result["n"] == 5
    assert result["top1"] == pytest.approx(0.8)
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    assert model.training, "evaluate restores the mode it found"


def test_recalibrate_bn_sets_running_stats_to_the_data_statistics():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    model = nn.Sequential(conv, nn.Dropout(0.5), nn.BatchNorm2d(4, momentum=0.1), nn.ReLU())
    bn = model[2]
    with torch.no_grad():
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(9.0)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 3, 8, 8, generator=g) * 2 + 1, torch.zeros(16, dtype=torch.long)) for _ in range(6)]
    recalibrate_bn(model, batches, n_batches=4)

    with torch.no_grad():  # BN's input over the first 4 batches (dropout off: eval mode)
        acts = torch.cat([conv(b[0]) for b in batches[:4]])
    expected_mean = acts.mean(dim=(0, 2, 3))
    assert torch.allclose(bn.running_mean, expected_mean, atol=1e-5), (bn.running_mean, expected_mean)
    # Variance: the average of the per-batch unbiased variances (momentum=None), close to the pooled one.
    per_batch_var = torch.stack([a.transpose(0, 1).reshape(4, -1).var(dim=1) for a in acts.split(16)]).mean(0)
    assert torch.allclose(bn.running_var, per_batch_var, rtol=1e-4)
    assert bn.num_batches_tracked.item() == 4
    assert bn.momentum == 0.1, "momentum restored"
    assert not model.training and not any(m.training for m in model.modules())


def test_fxprune_graph_module_finetunes_with_distillation(data):
    x, y, xe, ye = data
    dense = tiny_net(seed=3).eval()
    pruned = fxprune.compile(dense, 0.5, example_inputs=(torch.randn(1, 3, 8, 8),), round_to=1)
    assert isinstance(pruned, torch.fx.GraphModule)
    before = copy.deepcopy(pruned.state_dict())
    dense_state = copy.deepcopy(dense.state_dict())
    history = finetune(pruned, Loader(x, y, 32), FinetuneConfig(epochs=2, lr=0.05, distill_alpha=0.5,
                                                                 optimizer="adamw", max_grad_norm=5.0),
                       teacher=dense, eval_loader=Loader(xe, ye, 128, shuffle=False))
    assert history["steps"] == 16 and history["eval_top1"][-1] is not None
    assert not pruned.training
    assert any(not torch.equal(before[k], v) for k, v in pruned.state_dict().items())
    assert state_equal(dense, dense_state)
    assert pruned(xe[:4]).shape == (4, 2)
    recalibrate_bn(pruned, Loader(x, y, 64), n_batches=2)
    assert not pruned.training and 0 <= evaluate(pruned, Loader(xe, ye, 128))["top1"] <= 1


def test_invalid_configs_are_rejected(data):
    x, y, _, _ = data
    loader = Loader(x, y, 32)
    with pytest.raises(ConfigError, match="optimizer"):
        finetune(tiny_net(), loader, FinetuneConfig(optimizer="adam"))
    with pytest.raises(ConfigError, match="teacher"):
        finetune(tiny_net(), loader, FinetuneConfig(distill_alpha=0.5))
    with pytest.raises(ConfigError, match="len"):
        finetune(tiny_net(), iter([(x, y)]), FinetuneConfig())


def test_non_finite_loss_raises(data):
    x, y, _, _ = data
    with pytest.raises(FloatingPointError, match="step 1"):
        finetune(tiny_net(), Loader(x, y, 32), FinetuneConfig(epochs=1),
                 loss_fn=lambda out, target: out.sum() * float("nan"), callback=lambda *a: None)
