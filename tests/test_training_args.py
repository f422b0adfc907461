"""TrainingArguments against transformers 5.24's: every field accepted, the same defaults and
conversions, HfArgumentParser, the properties HF scripts read, and clear refusals."""
import dataclasses
import enum
import logging
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fasttrain import Trainer, TrainingArguments  # noqa: E402
from fasttrain.training_args import CANNOT_APPLY, NOT_YET  # noqa: E402
from tests._tiny import tiny_gpt, token_examples  # noqa: E402

HF = transformers.TrainingArguments

# Where fasttrain's resolved default deliberately differs from HF's (README: "Where fasttrain
# deliberately differs from HF"): fasttrain logs to log_history.jsonl unless told "none", uses
# its own DDP engine with torch's bucket size spelled out, resolves eval_steps up front, and
# leaves accelerate's config unset (it does not run accelerate).
DELIBERATE_DEFAULTS = {"report_to", "ddp_backend", "ddp_bucket_cap_mb", "eval_steps", "accelerator_config"}


def _plain(value):
    return value.value if isinstance(value, enum.Enum) else value


def _hf_names():
    return [f.name for f in dataclasses.fields(HF)]


def test_every_hf_field_is_a_field():
    ours = {f.name for f in dataclasses.fields(TrainingArguments)}
    assert sorted(set(_hf_names()) - ours) == []


def test_resolved_defaults_match_hf(tmp_path):
    os.chdir(tmp_path)  # both default output_dir to ./trainer_output
    hf, ours = HF(), TrainingArguments()
    differing = {name for name in _hf_names() if _plain(getattr(hf, name)) != getattr(ours, name)}
    assert differing == DELIBERATE_DEFAULTS
    assert ours.output_dir == hf.output_dir == "trainer_output"


def test_hf_argument_parser_builds_and_parses_like_hf(tmp_path):
    argv = ["--output_dir", str(tmp_path), "--learning_rate", "3e-4", "--warmup_steps", "0.1",
            "--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs", '{"min_lr_rate": "0.1"}',
            "--label_names", "labels", "start_positions", "--no_remove_unused_columns",
            "--gradient_accumulation_steps", "4", "--include_num_input_tokens_seen", "true",
            "--report_to", "none", "--eval_strategy", "steps", "--eval_steps", "20",
            "--dataloader_num_workers", "2", "--dataloader_prefetch_factor", "4"]
    (hf,) = transformers.HfArgumentParser((HF,)).parse_args_into_dataclasses(argv)
    (ours,) = transformers.HfArgumentParser((TrainingArguments,)).parse_args_into_dataclasses(argv)
    differing = {name for name in _hf_names() if _plain(getattr(hf, name)) != getattr(ours, name)}
    assert differing == {"ddp_backend", "ddp_bucket_cap_mb", "accelerator_config"}
    assert ours.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert ours.label_names == ["labels", "start_positions"] and ours.report_to == []


def test_json_strings_of_dict_fields_parse_as_hf():
    text = '{"num_cycles": "2", "flag": "True", "ratio": "0.5", "nested": {"n": "3"}, "name": "a"}'
    hf = HF(lr_scheduler_kwargs=text, gradient_checkpointing_kwargs='{"use_reentrant": false}')
    ours = TrainingArguments(lr_scheduler_kwargs=text, gradient_checkpointing_kwargs='{"use_reentrant": false}')
    assert ours.lr_scheduler_kwargs == hf.lr_scheduler_kwargs == \
        {"num_cycles": 2, "flag": True, "ratio": 0.5, "nested": {"n": 3}, "name": "a"}
    assert ours.gradient_checkpointing_kwargs == hf.gradient_checkpointing_kwargs == {"use_reentrant": False}
    with pytest.raises(ValueError, match=r"lr_scheduler_kwargs=.*not valid JSON"):
        TrainingArguments(lr_scheduler_kwargs='{"num_cycles": 2,}')


@pytest.mark.parametrize("value", [0.1, 0.25, 0.999, 0, 1, 7.0, 30])
def test_warmup_steps_below_one_is_a_ratio(value):
    assert TrainingArguments(warmup_steps=value).get_warmup_steps(97) == \
        HF(warmup_steps=value).get_warmup_steps(97)


def test_warmup_steps_fraction_above_one_refused():
    with pytest.raises(ValueError, match=r"warmup_steps=2.5 is invalid: .*whole"):
        TrainingArguments(warmup_steps=2.5)


def test_conversions_as_hf():
    for kwargs in ({"include_num_input_tokens_seen": True}, {"include_num_input_tokens_seen": False},
                   {"gradient_checkpointing": False}, {"eval_strategy": "steps"}, {"report_to": "none"},
                   {"report_to": ["none"]}, {"output_dir": "~/x"}, {"lr_scheduler_type": "reduce_lr_on_plateau",
                                                                   "eval_strategy": "epoch"}):
        hf, ours = HF(**kwargs), TrainingArguments(**kwargs)
        for name in ("include_num_input_tokens_seen", "gradient_checkpointing", "activation_checkpointing",
                     "do_eval", "output_dir", "metric_for_best_model", "greater_is_better"):
            assert getattr(ours, name) == _plain(getattr(hf, name)), (kwargs, name)
        assert ours.report_to == ([] if kwargs.get("report_to") else ["jsonl"])


def test_report_to_none_writes_no_log_files(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to="none", max_steps=3,
                             logging_steps=1, save_strategy="no", disable_tqdm=True, profile=False)
    trainer = Trainer(tiny_gpt(), args, train_dataset=token_examples(8))
    trainer.train()
    assert [r for r in trainer.state.log_history if "loss" in r]  # it did log, in memory
    assert not os.path.exists(tmp_path / "run") or os.listdir(tmp_path / "run") == []


def test_properties_hf_scripts_read(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    hf, ours = HF(), TrainingArguments()
    for name in ("local_rank", "world_size", "process_index", "local_process_index", "n_gpu",
                 "should_log", "should_save", "train_batch_size", "eval_batch_size", "device",
                 "ddp_timeout_delta", "place_model_on_device"):
        assert getattr(ours, name) == getattr(hf, name), name
    assert ours.parallel_mode.value == hf.parallel_mode.value == "not_parallel"
    with ours.main_process_first(desc="tokenize"):
        entered = True
    assert entered
    for level in ("debug", "info", "error", "passive"):
        assert TrainingArguments(log_level=level).get_process_log_level() == \
            (HF(log_level=level).get_process_log_level() if level != "passive"
             else logging.getLogger("fasttrain").getEffectiveLevel())
    d = ours.to_dict()
    assert set(_hf_names()) <= set(d) and isinstance(ours.to_json_string(), str)
    assert TrainingArguments(hub_token="secret").to_dict()["hub_token"] == "<HUB_TOKEN>"
    assert all(type(v) in (bool, int, float, str) for v in ours.to_sanitized_dict().values())


def test_should_log_follows_log_on_each_node(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")  # the second node's first process
    assert TrainingArguments().should_log
    assert not TrainingArguments(log_on_each_node=False).should_log
    assert not TrainingArguments().should_save  # global rank 0 writes checkpoints
    assert TrainingArguments().parallel_mode.value == "distributed"
    assert TrainingArguments(log_level="error", log_level_replica="debug").get_process_log_level() == logging.ERROR
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert TrainingArguments(log_level="error", log_level_replica="debug").get_process_log_level() == logging.DEBUG


@pytest.mark.parametrize("name,value", [("push_to_hub", True), ("deepspeed", "ds_config.json"),
                                        ("deepspeed", {"zero_optimization": {"stage": 3}}),
                                        ("parallelism_config", object()), ("debug", "underflow_overflow"),
                                        ("optim_target_modules", ["q_proj"]), ("hub_always_push", True)])
def test_fields_that_cannot_apply_are_refused_with_what_to_do(name, value):
    with pytest.raises(ValueError) as e:
        TrainingArguments(**{name: value})
    assert f"TrainingArguments.{name}=" in str(e.value) and CANNOT_APPLY[name] in str(e.value)


def test_hub_settings_without_push_are_inert():
    args = TrainingArguments(hub_model_id="me/model", hub_private_repo=True, hub_strategy="end")
    assert not args.push_to_hub


VALID_SETTINGS = {  # a valid, non-default value of each field
    "fsdp": "full_shard", "activation_checkpointing": True, "auto_find_batch_size": True,
    "eval_on_start": True, "label_smoothing_factor": 0.1, "neftune_noise_alpha": 5.0,
    "bf16_full_eval": True, "fp16_full_eval": True, "eval_accumulation_steps": 2,
    "include_for_metrics": ["inputs"], "batch_eval_metrics": True, "eval_do_concat_batches": False,
    "prediction_loss_only": True, "save_only_model": True, "restore_callback_states_from_checkpoint": True,
    "skip_memory_metrics": False, "train_sampling_strategy": "group_by_length", "eval_use_gather_object": True,
}


@pytest.mark.parametrize("name", sorted(NOT_YET))
def test_fields_not_implemented_yet_are_refused_never_ignored(name):
    value = VALID_SETTINGS[name]
    with pytest.raises(ValueError, match=rf"TrainingArguments\.{name}=.*not supported by fasttrain"):
        TrainingArguments(**{name: value})


@pytest.mark.parametrize("kwargs", [{"gradient_checkpointing": True}, {"activation_checkpointing": True},
                                    {"gradient_checkpointing": True, "activation_checkpointing": False},
                                    {"gradient_checkpointing_kwargs": '{"use_reentrant": false}'}])
def test_gradient_checkpointing_names_mirror_as_hf(kwargs):
    hf, ours = HF(**kwargs), TrainingArguments(**kwargs)
    for name in ("gradient_checkpointing", "activation_checkpointing", "gradient_checkpointing_kwargs",
                 "activation_checkpointing_kwargs"):
        assert getattr(ours, name) == getattr(hf, name), name


@pytest.mark.parametrize("name,value,needle", [
    ("log_level", "verbose", "accepted values are debug"),
    ("hub_strategy", "sometimes", "accepted values are end"),
    ("include_num_input_tokens_seen", "some", "accepted values are no, all, non_padding"),
    ("include_for_metrics", ["labels"], "each entry must be one of"),
    ("label_smoothing_factor", 1.0, "must be in [0, 1)"),
    ("torch_empty_cache_steps", 0, "positive integer"),
    ("dataloader_prefetch_factor", 2, "dataloader_num_workers > 0"),
    ("dataloader_multiprocessing_context", "thread", "fork, spawn, forkserver"),
    ("eval_delay", -1, "finite number >= 0"),
    ("accelerator_config", {"split_batches": True}, "split_batches=True is not supported"),
    ("accelerator_config", {"speed": 1}, "unknown key 'speed'"),
    ("liger_kernel_config", {"rope": True}, "no kernel for 'rope'"),
    ("fsdp", "full_shard sideways", "unknown option(s) ['sideways']"),
    ("lr_scheduler_type", "reduce_lr_on_plateau", "needs eval_strategy"),
    ("tf32", True, "Ampere"),
    ("ddp_broadcast_buffers", True, "ddp_backend='torch'"),
    ("report_to", "wandb", "an HF integration fasttrain does not ship"),
])
def test_bad_values_name_field_value_and_fix(name, value, needle):
    if name == "tf32" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU; tf32 may be valid")
    with pytest.raises(ValueError) as e:
        TrainingArguments(**{name: value})
    assert f"TrainingArguments.{name}=" in str(e.value) and needle in str(e.value)


@pytest.mark.parametrize("optim,library", [("adamw_8bit", "bitsandbytes"), ("adamw_torch_4bit", "torchao"),
                                           ("galore_adamw", "galore_torch"), ("lomo", "lomo_optim")])
def test_library_optimizers_name_the_missing_library(optim, library):
    import importlib.util
    if importlib.util.find_spec(library) is not None:
        pytest.skip(f"{library} is installed here")
    HF(optim=optim)  # a name HF knows
    with pytest.raises(ValueError, match=rf"optim='{optim}'.*`{library}` library, which is not installed"):
        TrainingArguments(optim=optim)


def test_liger_kernel_means_fasttrain_fused_loss():
    args = TrainingArguments(use_liger_kernel=True, fused_loss=False,
                             liger_kernel_config={"fused_linear_cross_entropy": True, "rope": False})
    assert args.fused_loss


def test_dataloader_fields_reach_the_dataloader(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), dataloader_num_workers=1,
                             dataloader_persistent_workers=True, dataloader_prefetch_factor=3,
                             dataloader_multiprocessing_context="spawn", dataloader_in_order=False,
                             report_to="none")
    loader = Trainer(tiny_gpt(), args, train_dataset=token_examples(4)).get_train_dataloader()
    assert loader.persistent_workers and loader.prefetch_factor == 3 and not loader.in_order
    assert loader.multiprocessing_context.get_start_method() == "spawn"


def test_use_cache_log_level_and_full_determinism_applied(tmp_path):
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    model.config.use_cache = False
    fasttrain_logger = logging.getLogger("fasttrain")
    level = fasttrain_logger.level
    try:
        args = TrainingArguments(output_dir=str(tmp_path), log_level="error", full_determinism=True,
                                 max_steps=1, report_to="none", save_strategy="no", disable_tqdm=True)
        trainer = Trainer(model, args, train_dataset=token_examples(4))
        assert fasttrain_logger.level == logging.ERROR
        assert model.config.use_cache is False  # use_cache=False leaves the model's own setting (README)
        Trainer(model, TrainingArguments(output_dir=str(tmp_path), use_cache=True, report_to="none"))
        assert model.config.use_cache is True
        trainer.train()
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
        fasttrain_logger.setLevel(level)


@pytest.mark.parametrize("backend", ["nccl", "gloo", "fasttrain", "torch"])
def test_ddp_backend_takes_hf_group_backends(backend):
    assert TrainingArguments(ddp_backend=backend).ddp_backend == backend
