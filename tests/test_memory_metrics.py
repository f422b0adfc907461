"""skip_memory_metrics=False: the memory keys transformers 5.24 reports (its Trainer as the
oracle for which keys appear where), with figures that see a known allocation."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import fasttrain  # noqa: E402
from fasttrain.profiler.memory_metrics import MemoryMetrics  # noqa: E402
from tests._tiny import Classifier, sign_examples  # noqa: E402

MIB = 2 ** 20


def _mem_keys(metrics):
    return {k for k in metrics if "_mem_" in k}


def test_the_keys_hf_reports_for_train_evaluate_and_predict(tmp_path):
    keys = {}
    for lib in (transformers, fasttrain):
        args = lib.TrainingArguments(output_dir=str(tmp_path / lib.__name__), skip_memory_metrics=False,
                                     max_steps=2, per_device_train_batch_size=4, report_to="none",
                                     disable_tqdm=True, save_strategy="no", eval_strategy="steps", eval_steps=1)
        trainer = lib.Trainer(Classifier(), args, train_dataset=sign_examples(), eval_dataset=sign_examples(8))
        train = trainer.train().metrics
        logged = trainer.state.log_history[-1]
        evaluated = trainer.evaluate()
        predicted = trainer.predict(sign_examples(8)).metrics
        keys[lib.__name__] = [_mem_keys(m) for m in (train, logged, evaluated, predicted)]
    assert keys["fasttrain"] == keys["transformers"]
    train, logged, evaluated, predicted = keys["fasttrain"]
    assert train == logged == {"init_mem_cpu_alloc_delta", "init_mem_cpu_peaked_delta", "before_init_mem_cpu",
                               "train_mem_cpu_alloc_delta", "train_mem_cpu_peaked_delta"}
    assert evaluated == {"eval_mem_cpu_alloc_delta", "eval_mem_cpu_peaked_delta"}  # nested evals: none
    assert predicted == {"test_mem_cpu_alloc_delta", "test_mem_cpu_peaked_delta"}


def test_default_reports_none(tmp_path):
    args = fasttrain.TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4,
                                       report_to="none", disable_tqdm=True, save_strategy="no")
    assert not _mem_keys(fasttrain.Trainer(Classifier(), args, train_dataset=sign_examples()).train().metrics)


def test_figures_see_a_kept_and_a_freed_allocation():
    """64 MiB kept (alloc delta) and 128 MiB allocated then freed (peaked delta), touched so
    they are resident; the process's other allocations stay far below these."""
    tracker = MemoryMetrics(True, torch.device("cpu"))
    tracker.start("train")
    kept = torch.ones(64 * MIB // 4)
    freed = torch.ones(128 * MIB // 4)
    del freed
    metrics = {}
    tracker.stop_and_update("train", metrics)
    assert 60 * MIB < metrics["train_mem_cpu_alloc_delta"] < 80 * MIB
    assert 120 * MIB < metrics["train_mem_cpu_peaked_delta"] < 140 * MIB
    tracker.start("eval")
    tracker.start("train")  # nested: ignored
    tracker.stop_and_update("train", metrics := {})
    assert metrics == {}
    tracker.stop_and_update("eval", metrics)
    assert abs(metrics["eval_mem_cpu_alloc_delta"]) < 8 * MIB and metrics["eval_mem_cpu_peaked_delta"] < 8 * MIB
    del kept


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_adds_hfs_gpu_keys_and_sees_a_device_allocation(tmp_path):
    keys = {}
    for lib in (transformers, fasttrain):
        args = lib.TrainingArguments(output_dir=str(tmp_path / lib.__name__), skip_memory_metrics=False,
                                     max_steps=2, per_device_train_batch_size=4, report_to="none",
                                     disable_tqdm=True, save_strategy="no")
        trainer = lib.Trainer(Classifier(), args, train_dataset=sign_examples(), eval_dataset=sign_examples(8))
        keys[lib.__name__] = (_mem_keys(trainer.train().metrics), _mem_keys(trainer.evaluate()))
    assert keys["fasttrain"] == keys["transformers"]
    assert {"train_mem_gpu_alloc_delta", "train_mem_gpu_peaked_delta", "before_init_mem_gpu"} <= keys["fasttrain"][0]
    tracker = MemoryMetrics(True, torch.device("cuda"))
    tracker.start("train")
    kept = torch.ones(64 * MIB // 4, device="cuda")
    freed = torch.ones(128 * MIB // 4, device="cuda")
    del freed
    metrics = {}
    tracker.stop_and_update("train", metrics)
    assert metrics["train_mem_gpu_alloc_delta"] == 64 * MIB  # torch's allocated bytes: exact
    assert metrics["train_mem_gpu_peaked_delta"] == 128 * MIB
    del kept
