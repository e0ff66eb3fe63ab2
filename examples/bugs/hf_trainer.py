"""A Hugging Face ``Trainer`` fine-tuning script with the testbed callback, and reported mistakes as switches.

    torchrun --nproc-per-node 3 examples/bugs/hf_trainer.py --bug own_loader --out runs/hf
    torchrun --nproc-per-node 3 examples/bugs/hf_trainer.py --bug none,own_loader --out runs/hf

Models are built from small configs (nothing is downloaded): a BERT sequence classifier on token
sequences of varying length, padded per batch by ``DataCollatorWithPadding`` (the ledger's
fingerprints ignore the padding, so a sample is one sample however it was padded), and a small
ResNet (BatchNorm) on images for the buffer bug. Each bug is the line marked ``# BUG``:

- ``none`` (healthy twin), ``bn`` (healthy twin with BatchNorm: the Trainer's DDP broadcasts buffers);
- ``own_loader``: ``get_train_dataloader`` overridden with a plain DataLoader that the Trainer's
  accelerator never shards - every rank trains on the whole dataset, in the same order
  (transformers PR #11254, huggingface/datasets#5360: "the training will be on the same data on
  all processes");
- ``no_broadcast_buffers``: ``TrainingArguments(ddp_broadcast_buffers=False)`` with a BatchNorm
  model - each rank keeps its own running statistics;
- ``rank0_checkpoint``: a callback loads weights on rank 0 only at ``on_train_begin``, after the
  Trainer wrapped the model in DDP - the replicas differ from the first step.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import testbed

HEALTHY = ("none", "bn")
BUGS = ("own_loader", "no_broadcast_buffers", "rank0_checkpoint")
EPOCHS, BATCH, SIZE = 3, 8, 144


class TokenData(torch.utils.data.Dataset):
    """Token sequences of 5..20 tokens, labelled by a fixed rule (learnable)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.items = []
        for _ in range(SIZE):
            ids = torch.randint(3, 64, (int(torch.randint(5, 21, (1,), generator=g)),), generator=g)
            self.items.append({"input_ids": ids.tolist(), "labels": int(ids.float().mean() > 33)})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class ImageData(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(SIZE, 3, 16, 16, generator=g)
        self.y = (self.x.mean(dim=(1, 2, 3)) > 0).long()

    def __len__(self) -> int:
        return SIZE

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def build(bug: str):
    from transformers import (BertConfig, BertForSequenceClassification, DataCollatorWithPadding,
                              PreTrainedTokenizerFast, ResNetConfig, ResNetForImageClassification)

    torch.manual_seed(0)
    if bug in ("bn", "no_broadcast_buffers"):
        config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=2)
        return ResNetForImageClassification(config), ImageData(), None
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_tokenizer(), pad_token="[PAD]")
    return BertForSequenceClassification(config), TokenData(), DataCollatorWithPadding(tokenizer)


def _tokenizer():
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, **{str(i): i for i in range(2, 64)}}, unk_token="[UNK]"))


def train(bug: str, out: Path) -> None:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model, data, collator = build(bug)
    args = TrainingArguments(output_dir=str(out / bug / "trainer"), use_cpu=True, ddp_backend="gloo", report_to="none",
                             save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
                             num_train_epochs=EPOCHS, per_device_train_batch_size=BATCH, learning_rate=1e-3,
                             dataloader_num_workers=0,
                             ddp_broadcast_buffers=bug != "no_broadcast_buffers")  # BUG (no_broadcast_buffers)

    class OwnLoaderTrainer(Trainer):
        def get_train_dataloader(self):  # BUG: a DataLoader of our own, never sharded by the accelerator
            return DataLoader(self.train_dataset, batch_size=BATCH, shuffle=True, collate_fn=self.data_collator,
                              generator=torch.Generator().manual_seed(0))

    class LoadOnRank0(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if dist.get_rank() == 0:  # BUG: weights loaded on one rank after the Trainer wrapped the model
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(0.01)

    cls = OwnLoaderTrainer if bug == "own_loader" else Trainer
    trainer = cls(model=model, args=args, train_dataset=data, data_collator=collator)
    if bug == "rank0_checkpoint":
        trainer.add_callback(LoadOnRank0())
    trainer.add_callback(testbed.TestbedCallback(trainer, out_dir=out / bug, overwrite=True))
    trainer.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bug", default="none", help="one or more of: " + ", ".join(HEALTHY + BUGS))
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    for bug in args.bug.split(","):
        if bug not in HEALTHY + BUGS:
            raise SystemExit(f"unknown bug {bug!r}; known: {', '.join(HEALTHY + BUGS)}")
        train(bug, args.out)


if __name__ == "__main__":
    main()
