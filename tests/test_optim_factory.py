"""optim names as HF's Trainer builds them: the same optimizer and the same updates on the
same gradients, optim_args included; refusals name the field."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fasttrain import TrainingArguments  # noqa: E402
from fasttrain.optim.factory import build_optimizer  # noqa: E402


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.norm, self.fc2 = torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


def _hf_optimizer(model, **kwargs):
    args = transformers.TrainingArguments(output_dir="unused", report_to="none", use_cpu=True, **kwargs)
    return transformers.Trainer(model=model, args=args).create_optimizer()


def _run(model, optimizer, steps=3):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(5, 6, generator=g)
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("optim,optim_args", [
    ("adamw_torch", None), ("adamw_torch_fused", None), ("sgd", None),
    ("sgd", "momentum=0.9,nesterov=True,dampening=0"), ("adagrad", "lr_decay=0.01,eps=1e-9"),
    ("rmsprop", None), ("rmsprop", "momentum=0.5,alpha=0.9,centered=True"),
])
def test_same_optimizer_and_updates_as_hf(optim, optim_args):
    settings = dict(optim=optim, optim_args=optim_args, learning_rate=0.05, weight_decay=0.1,
                    adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6)
    ours_model, hf_model = _Net(), _Net()
    ours = build_optimizer(TrainingArguments(**settings), ours_model)
    ref = _hf_optimizer(hf_model, **settings)
    assert type(ours) is type(ref)
    for key in ("momentum", "nesterov", "dampening", "lr_decay", "alpha", "centered", "eps", "betas", "fused"):
        if key in ref.defaults:
            assert ours.defaults[key] == ref.defaults[key], key
    # fp32, same order of operations: equal to a few ulps (the fused kernel reads a tensor LR)
    torch.testing.assert_close(_run(ours_model, ours), _run(hf_model, ref), rtol=0, atol=1e-6)


def test_adafactor_is_torch_adafactor_at_the_given_lr():
    model = _Net()
    opt = build_optimizer(TrainingArguments(optim="adafactor", learning_rate=0.01), model)
    assert type(opt) is torch.optim.Adafactor and opt.defaults["lr"] == 0.01
    before = _run(copy.deepcopy(model), build_optimizer(TrainingArguments(optim="adafactor", learning_rate=0.0), model))
    assert not torch.equal(_run(model, opt), before)  # it moves the weights; lr=0 does not


@pytest.mark.parametrize("optim_args,needle", [("momentum", "write 'key=value"),
                                               ("warp=9", "['warp'] is not an argument of SGD")])
def test_bad_optim_args_name_the_field(optim_args, needle):
    with pytest.raises(ValueError) as e:  # the syntax at construction, the keys when building
        build_optimizer(TrainingArguments(optim="sgd", optim_args=optim_args), _Net())
    assert "TrainingArguments.optim_args=" in str(e.value) and needle in str(e.value)
