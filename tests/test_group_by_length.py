"""train_sampling_strategy="group_by_length": HF's length-grouped order (its own
LengthGroupedSampler / DistributedLengthGroupedSampler as the oracle), lengths read as HF's
Trainer reads them (length_column_name, the processing class's model_input_names)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from transformers.trainer_pt_utils import DistributedLengthGroupedSampler, LengthGroupedSampler  # noqa: E402

from fasttrain import Trainer, TrainingArguments  # noqa: E402
from fasttrain.distributed.sampler import ShardedSampler  # noqa: E402


def _lengths(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 40, (n,), generator=g).tolist()


@pytest.mark.parametrize("n,batch", [(37, 4), (500, 2), (9, 8), (1, 1)])
@pytest.mark.parametrize("epoch", [0, 3])
def test_one_rank_is_hfs_length_grouped_sampler(n, batch, epoch):
    lengths = _lengths(n)
    ours = ShardedSampler(n, seed=7, lengths=lengths, group_batch_size=batch)
    ours.set_epoch(epoch)
    theirs = LengthGroupedSampler(batch, lengths=lengths, generator=torch.Generator().manual_seed(7 + epoch))
    assert list(ours) == list(theirs)
    first = list(ours)[0]
    assert lengths[first] == max(lengths)  # the longest example comes first (an OOM shows at once)


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_are_hfs_distributed_length_grouped_sampler(world, drop_last):
    n, lengths = 101, _lengths(101, seed=1)
    for rank in range(world):
        ours = ShardedSampler(n, rank=rank, world_size=world, seed=5, drop_last=drop_last, lengths=lengths,
                              group_batch_size=4)
        theirs = DistributedLengthGroupedSampler(4, num_replicas=world, rank=rank, seed=5, drop_last=drop_last,
                                                 lengths=lengths)
        for epoch in (0, 1):
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs), (rank, epoch)


def test_resuming_mid_epoch_continues_the_grouped_order():
    lengths = _lengths(40)
    full = ShardedSampler(40, seed=2, lengths=lengths, group_batch_size=4)
    full.set_epoch(1)
    resumed = ShardedSampler(40, seed=2, lengths=lengths, group_batch_size=4)
    resumed.load_state_dict(full.state_dict(consumed=12))
    assert list(resumed) == list(full)[12:]


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 2)

    def forward(self, input_ids=None, labels=None, length=None):
        loss = self.emb(input_ids).float().mean()
        return {"loss": loss}


class Tokenizer:
    model_input_names = ["tokens", "attention_mask"]


def _examples(n, key="input_ids"):
    return [{key: list(range(1, 1 + length))} for length in _lengths(n, seed=3)]


def _train_order(dataset, processing_class=None, **kw):
    args = TrainingArguments(output_dir="/tmp/unused", report_to="none", per_device_train_batch_size=2,
                             gradient_accumulation_steps=3, seed=11, train_sampling_strategy="group_by_length", **kw)
    trainer = Trainer(Model(), args, train_dataset=dataset, processing_class=processing_class,
                      data_collator=lambda f: f)
    return list(trainer.get_train_dataloader().sampler)


def test_trainer_groups_by_model_input_length_with_batch_times_accumulation():
    data = _examples(30)
    expected = LengthGroupedSampler(2 * 3, lengths=[len(e["input_ids"]) for e in data],
                                    generator=torch.Generator().manual_seed(11))
    assert _train_order(data) == list(expected)


def test_trainer_reads_the_processing_classs_first_model_input_name():
    data = _examples(30, key="tokens")
    expected = LengthGroupedSampler(6, lengths=[len(e["tokens"]) for e in data],
                                    generator=torch.Generator().manual_seed(11))
    assert _train_order(data, processing_class=Tokenizer(), remove_unused_columns=False) == list(expected)
    with pytest.raises(ValueError, match="group_by_length.*'input_ids' key.*hold \\['tokens'\\]"):
        _train_order(data, remove_unused_columns=False)


def test_trainer_reads_length_column_name_as_hf_does():
    rows = _examples(30)
    declared = list(reversed(range(30)))  # a length column that disagrees with input_ids
    ds = datasets.Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows], "n_tok": declared})
    expected = list(LengthGroupedSampler(6, lengths=declared, generator=torch.Generator().manual_seed(11)))
    assert _train_order(ds, length_column_name="n_tok", remove_unused_columns=False) == expected
    # as in HF, the column counts only if it survives remove_unused_columns (forward takes no n_tok)
    by_ids = LengthGroupedSampler(6, lengths=[len(r["input_ids"]) for r in rows],
                                  generator=torch.Generator().manual_seed(11))
    assert _train_order(ds, length_column_name="n_tok") == list(by_ids)
    # the default column name, "length", is an argument of this model's forward: kept and used
    ds = ds.rename_column("n_tok", "length")
    assert _train_order(ds) == expected


def test_hf_trainer_reads_lengths_the_same_way(tmp_path):
    """HF's own Trainer on the same dataset builds its sampler from the same lengths."""
    rows = _examples(30)
    declared = list(reversed(range(30)))
    ds = datasets.Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows], "n_tok": declared})
    for kw, lengths in (({"length_column_name": "n_tok", "remove_unused_columns": False}, declared),
                        ({"length_column_name": "n_tok"}, [len(r["input_ids"]) for r in rows])):
        args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to="none", seed=11,
                                              per_device_train_batch_size=2, gradient_accumulation_steps=3,
                                              train_sampling_strategy="group_by_length", **kw)
        hf = transformers.Trainer(Model(), args, train_dataset=ds, data_collator=lambda f: f)
        sampler = hf._get_train_sampler(hf._remove_unused_columns(ds))  # what its get_train_dataloader does
        assert isinstance(sampler, LengthGroupedSampler) and sampler.lengths == lengths
        assert sampler.batch_size == 6


def test_training_sees_the_longest_example_first_and_similar_lengths_together(tmp_path):
    from tests._tiny import tiny_gpt, token_examples
    data = token_examples(48, seq_len=24, ragged=True)
    spread = {}
    for strategy in ("random", "group_by_length"):
        seen = []

        def pad(features, seen=seen):
            width = max(len(f["input_ids"]) for f in features)
            seen.append([len(f["input_ids"]) for f in features])
            ids = torch.stack([torch.nn.functional.pad(f["input_ids"], (0, width - len(f["input_ids"])))
                               for f in features])
            return {"input_ids": ids, "labels": torch.where(ids == 0, -100, ids)}
        args = TrainingArguments(output_dir=str(tmp_path / strategy), report_to="none", disable_tqdm=True,
                                 save_strategy="no", per_device_train_batch_size=4, max_steps=12,
                                 train_sampling_strategy=strategy)
        Trainer(tiny_gpt(), args, train_dataset=data, data_collator=pad).train()
        spread[strategy] = sum(max(b) - min(b) for b in seen) / len(seen)
        if strategy == "group_by_length":
            assert max(seen[0]) == max(len(e["input_ids"]) for e in data)
    assert spread["group_by_length"] < 0.6 * spread["random"]  # less padding per batch
