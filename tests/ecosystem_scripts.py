"""Launched by tests/test_ecosystem.py under torchrun (2 gloo ranks): runs the documented snippets of
README.md and docs/monitor.md *as written*, binding the names they leave free (the user's model,
loader, optimizer, Trainer arguments ...), and records what the model itself computed - the
reference the test compares the monitor's rows against.

    torchrun --standalone --nproc-per-node 2 tests/ecosystem_scripts.py MODE[,MODE...] OUT

MODE: ``plain`` | ``fsdp2`` | ``accelerate`` | ``trainer`` | ``lightning`` (the snippets of that kind, see
tests/doc_snippets.py) or ``gpt2`` (a Trainer run of a tiny GPT-2 with a callback that makes its own
training-mode forwards). Each snippet runs with ``OUT/<snippet id>/`` as its working directory, so
its ``runs/mine`` lands there; the harness writes ``expected_rank<r>.json`` beside it.
``ECO_ONLY=<snippet id>`` in the environment runs that snippet alone (debugging).

Snippets share one process group (``dist.init_process_group`` is made idempotent, see
``_init_once``). The plain snippets see zero-gradient steps: every rank's first batch has weight 0 (all gradients
zero: no cosine at all) and rank 1's second batch too (one rank without a cosine).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.doc_snippets import snippets  # noqa: E402

BATCH, ACCUM, STEPS = 4, 2, 3
ROGUE = {"active": False, "forwards": 0}  # set while another callback makes its own forward
_init_process_group = dist.init_process_group


def _init_once(*args: Any, **kwargs: Any) -> None:
    """Every plain snippet starts with ``dist.init_process_group()``; in this one process the first
    call creates the group and the later ones reuse it. Destroying and re-creating the default group
    in one process is not safe: with gloo, 1 in ~6 runs here deadlocked when a DDP model holding the
    destroyed group was freed (~ProcessGroupGloo joins its worker thread while holding the GIL; the
    thread waits for the GIL to free a finished barrier's tensors)."""
    if not dist.is_initialized():
        _init_process_group(*args, **kwargs)


dist.init_process_group = _init_once  # what the snippets' `dist.init_process_group()` calls


@dataclass
class Out:
    loss: torch.Tensor


class Regression(torch.nn.Module):
    """A user's model: ``model(**batch).loss``; a batch weight ``w`` of 0 gives an exactly zero gradient."""

    def __init__(self, record: list[float]):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 1)
        self.record = record

    def forward(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> Out:
        loss = (w * (self.lin(x).squeeze(-1) - y) ** 2).mean()
        if self.training and torch.is_grad_enabled():
            self.record.append(float(loss.detach()))
        return Out(loss)


class RankData(Dataset):
    """Rank-specific samples; weight 0 on every rank's first batch and on rank 1's second."""

    def __init__(self, rank: int, size: int):
        g = torch.Generator().manual_seed(rank)
        self.x, self.y = torch.randn(size, 4, generator=g), torch.randn(size, generator=g)
        self.w = torch.ones(size)
        self.w[:BATCH] = 0.0
        if rank == 1:
            self.w[BATCH:2 * BATCH] = 0.0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i], "w": self.w[i]}


Bound = tuple[dict[str, Any], Callable[[], list[float]]]  # the snippet's free names; the model's own losses


def bind_plain(rank: int, size: int = 6 * BATCH) -> Bound:
    record: list[float] = []
    model = Regression(record)
    return {"model": model, "loader": DataLoader(RankData(rank, size), batch_size=BATCH),
            "optimizer": torch.optim.SGD(model.parameters(), lr=0.1), "per_rank_batch": BATCH, "accum": ACCUM,
            "steps": STEPS}, lambda: record


class LayeredRegression(Regression):
    """A user's model with the ``model.layers`` the FSDP2 snippet shards one by one."""

    def __init__(self, record: list[float]):
        super().__init__(record)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])

    def forward(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> Out:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return super().forward(x, y, w)


def bind_fsdp2(rank: int) -> Bound:
    record: list[float] = []
    return {"model": LayeredRegression(record), "loader": DataLoader(RankData(rank, 6 * BATCH), batch_size=BATCH),
            "per_rank_batch": BATCH}, lambda: record


def bind_accelerate(rank: int) -> Bound:
    return bind_plain(rank, size=8 * BATCH)  # accelerate deals the 8 batches out: 4 per rank, 2 steps


class Recorder:
    """The model's own loss on each training forward of the Trainer (not the probes, not a rogue)."""

    def __init__(self, model: torch.nn.Module, own_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.own_loss, self.losses, self.num_items = own_loss, [], []
        model.register_forward_hook(self.hook, with_kwargs=True)

    def hook(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if ROGUE["active"] or not (module.training and torch.is_grad_enabled()):
            return
        self.losses.append(float(self.own_loss(output.logits.detach(), kwargs["labels"])))
        self.num_items.append(float(kwargs["num_items_in_batch"]) if "num_items_in_batch" in kwargs else None)


def classifier_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[..., :-1, :].reshape(-1, logits.shape[-1]), labels[..., 1:].reshape(-1),
                           ignore_index=-100)


class TokenData(Dataset):
    """Random token rows; class labels, or causal-LM labels with the first ``i % 3`` positions masked."""

    def __init__(self, size: int, causal: bool):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 64, (size, 8), generator=g)
        self.causal = causal

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not self.causal:
            return {"input_ids": self.ids[i], "labels": torch.tensor(i % 3)}
        labels = self.ids[i].clone()
        labels[:i % 3] = -100
        return {"input_ids": self.ids[i], "labels": labels}


def training_args(output_dir: str, **changes: Any) -> Any:
    from transformers import TrainingArguments

    kwargs = dict(output_dir=output_dir, use_cpu=True, ddp_backend="gloo", max_steps=STEPS,
                  per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM, save_strategy="no",
                  disable_tqdm=True, dataloader_num_workers=0, seed=0, report_to="none")
    kwargs.update(changes)
    return TrainingArguments(**kwargs)


def bind_trainer(rank: int) -> Bound:
    """A tiny random BertForSequenceClassification (no hub) that reports to TensorBoard every step."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32,
                                                     max_position_embeddings=16, num_labels=3))
    recorder = Recorder(model, classifier_loss)
    return {"model": model, "args": training_args("trainer", report_to="tensorboard", logging_steps=1),
            "ds": TokenData(64, causal=False)}, lambda: recorder.losses


class LitRegression:  # built lazily: lightning is imported only in the lightning mode
    @staticmethod
    def make(record: list[float]) -> Any:
        import lightning as L

        class Lit(L.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                torch.manual_seed(0)
                self.lin = torch.nn.Linear(4, 1)

            def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
                x, y = batch
                loss = ((self.lin(x).squeeze(-1) - y) ** 2).mean()
                record.append(float(loss.detach()))
                return loss

            def configure_optimizers(self) -> torch.optim.Optimizer:
                return torch.optim.SGD(self.parameters(), lr=0.1)

        return Lit()


def bind_lightning(rank: int) -> Bound:
    g = torch.Generator().manual_seed(2)
    data = TensorDataset(torch.randn(16 * BATCH, 4, generator=g), torch.randn(16 * BATCH, generator=g))
    record: list[float] = []
    return {"model": LitRegression.make(record), "loader": DataLoader(data, batch_size=BATCH),
            "per_rank_batch": BATCH}, lambda: record


BIND = {"plain": bind_plain, "fsdp2": bind_fsdp2, "accelerate": bind_accelerate, "trainer": bind_trainer,
        "lightning": bind_lightning}


def run_block(block: dict[str, str], out: Path, rank: int) -> None:
    """Exec the snippet's text unchanged in ``out``, with the free names bound."""
    out.mkdir(parents=True, exist_ok=True)
    namespace, reference = BIND[block["kind"]](rank)
    here = os.getcwd()
    os.chdir(out)
    try:
        exec(compile(block["code"], f"<{block['doc']} snippet {block['id']}>", "exec"), namespace)
    finally:
        os.chdir(here)
    if namespace.get("monitor") is not None:
        namespace["monitor"].close()
    (out / f"expected_rank{rank}.json").write_text(json.dumps({"losses": reference()}))


def run_gpt2(out: Path, rank: int) -> None:
    """A tiny GPT-2 (loss_type None: the Trainer counts labels before the shift) whose loss must be
    the model's own token mean, with a callback that makes its own training-mode forward each step."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback

    from testbed import TestbedCallback

    class Rogue(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            batch = TokenData(2, causal=True)[1]
            ROGUE["active"] = True
            try:
                model(input_ids=batch["input_ids"][None], labels=batch["labels"][None])  # training mode, with grad
                ROGUE["forwards"] += 1
            finally:
                ROGUE["active"] = False

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=16,
                                       bos_token_id=0, eos_token_id=0))
    recorder = Recorder(model, causal_lm_loss)
    trainer = Trainer(model=model, args=training_args(str(out / "trainer"), logging_strategy="no"),
                      train_dataset=TokenData(64, causal=True))
    trainer.add_callback(TestbedCallback(trainer, out_dir=out / "runs"))
    trainer.add_callback(Rogue())  # after TestbedCallback: its forward falls inside the armed step
    trainer.train()
    (out / f"expected_rank{rank}.json").write_text(json.dumps(
        {"losses": recorder.losses, "num_items": recorder.num_items, "rogue_forwards": ROGUE["forwards"]}))


def main() -> None:
    modes, out = sys.argv[1].split(","), Path(sys.argv[2]).resolve()
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    for mode in modes:
        if mode == "gpt2":
            run_gpt2(out / "gpt2", rank)
            continue
        for block in (b for b in snippets() if b["kind"] == mode and os.environ.get("ECO_ONLY", b["id"]) == b["id"]):
            run_block(block, out / block["id"], rank)


if __name__ == "__main__":
    main()
