"""auto_find_batch_size: an out-of-memory error in training retries with a smaller batch, the
sizes transformers 5.24 tries (its Trainer as the oracle, the OOM injected by the model)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import fasttrain  # noqa: E402
from fasttrain.trainer.batch_size_search import is_out_of_memory, run_with_shrinking_batch  # noqa: E402


def _oom():
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.10 GiB total)")


class FitsUpTo(torch.nn.Module):
    """A classifier that runs out of memory on training batches larger than `limit`."""

    def __init__(self, limit, eval_oom=False):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(4, 2)
        self.limit, self.eval_oom, self.seen = limit, eval_oom, []

    def forward(self, x, labels=None):
        if self.training:
            self.seen.append(x.shape[0])
            if x.shape[0] > self.limit:
                raise _oom()
        elif self.eval_oom:
            raise _oom()
        logits = self.linear(x)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return [{"x": x[i], "labels": (x[i, 0] > 0).long()} for i in range(n)]


def _train(lib, tmp_path, model, **kw):
    args = lib.TrainingArguments(output_dir=str(tmp_path / lib.__name__), auto_find_batch_size=True,
                                 per_device_train_batch_size=8, max_steps=3, report_to="none",
                                 disable_tqdm=True, save_strategy="no", **kw)
    trainer = lib.Trainer(model, args, train_dataset=_data(), eval_dataset=_data(8))
    trainer.args_given = args
    return trainer, trainer.train()


def test_retries_the_batch_sizes_hf_tries(tmp_path):
    runs = {}
    for lib in (transformers, fasttrain):
        model = FitsUpTo(3)
        trainer, out = _train(lib, tmp_path, model)
        runs[lib.__name__] = (model.seen, trainer.state.train_batch_size, out.global_step)
        runs[lib.__name__ + "_trainer"] = (trainer._train_batch_size, trainer.args_given.per_device_train_batch_size)
    assert runs["fasttrain"] == runs["transformers"]
    assert runs["fasttrain"] == ([8, 7, 6, 5, 4, 3, 3, 3], 3, 3)
    assert runs["fasttrain_trainer"] == runs["transformers_trainer"] == (3, 8)  # args passed in: untouched


def test_without_it_the_out_of_memory_error_propagates(tmp_path):
    args = fasttrain.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1,
                                       report_to="none", disable_tqdm=True, save_strategy="no")
    with pytest.raises(torch.OutOfMemoryError):
        fasttrain.Trainer(FitsUpTo(3), args, train_dataset=_data()).train()


def test_an_evaluation_out_of_memory_is_not_retried_with_a_smaller_training_batch(tmp_path):
    model = FitsUpTo(8, eval_oom=True)
    with pytest.raises(RuntimeError, match="Evaluation hit an out-of-memory error.*per_device_eval_batch_size"):
        _train(fasttrain, tmp_path, model, eval_strategy="steps", eval_steps=2)
    assert set(model.seen) == {8}  # never shrunk


def test_gives_up_at_zero_and_lets_other_errors_through():
    tried = []

    def always_oom(batch_size):
        tried.append(batch_size)
        raise _oom()
    with pytest.raises(RuntimeError, match="auto_find_batch_size: .*every per-device batch size from 4 down to 1"):
        run_with_shrinking_batch(always_oom, 4)
    assert tried == [4, 3, 2, 1]

    def broken(batch_size):
        tried.append(batch_size)
        raise ValueError("not memory")
    tried.clear()
    with pytest.raises(ValueError):
        run_with_shrinking_batch(broken, 4)
    assert tried == [4]


@pytest.mark.parametrize("error,expected", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried"), True),
    (RuntimeError("shape mismatch"), False),
    (ValueError("CUDA out of memory."), False),  # HF's test: RuntimeErrors only
])
def test_out_of_memory_is_recognised_as_hf_recognises_it(error, expected):
    from accelerate.utils.memory import should_reduce_batch_size
    assert is_out_of_memory(error) == should_reduce_batch_size(error) == expected


def test_a_resumed_search_starts_from_the_batch_size_the_checkpoint_found(tmp_path):
    first = FitsUpTo(3)
    args = dict(output_dir=str(tmp_path), auto_find_batch_size=True, per_device_train_batch_size=8,
                report_to="none", disable_tqdm=True, save_steps=2)
    fasttrain.Trainer(first, fasttrain.TrainingArguments(max_steps=2, **args), train_dataset=_data()).train()
    assert first.seen == [8, 7, 6, 5, 4, 3, 3]
    again = FitsUpTo(3)
    trainer = fasttrain.Trainer(again, fasttrain.TrainingArguments(max_steps=4, **args), train_dataset=_data())
    out = trainer.train(resume_from_checkpoint=True)
    assert again.seen == [3, 3] and out.global_step == 4  # no out-of-memory round trip, as HF


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_real_cuda_out_of_memory_is_retried(tmp_path):
    """The allocator's own error: batches above 3 ask for more than the device holds."""
    class Greedy(FitsUpTo):
        def forward(self, x, labels=None):
            if self.training:
                self.seen.append(x.shape[0])
                if x.shape[0] > self.limit:
                    torch.empty(2 ** 50, dtype=torch.uint8, device=x.device)  # 1 PiB: a real OutOfMemoryError
            logits = self.linear(x)
            return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}
    model = Greedy(3)
    trainer, out = _train(fasttrain, tmp_path, model)
    assert model.seen == [8, 7, 6, 5, 4, 3, 3, 3] and out.global_step == 3
