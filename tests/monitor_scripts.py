"""Training scripts launched under torchrun by tests/test_monitor.py: a user's own DDP loop and a
Hugging Face Trainer run, each with the drop-in monitor attached, each reproducing exactly what
the built-in runner does for the same scenario (same initial weights, same batches per rank).

    torchrun --standalone --nproc-per-node 2 tests/monitor_scripts.py {ddp|trainer} SCENARIO.json OUT

SCENARIO.json holds ``Scenario.to_dict()``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import testbed
from testbed.workloads.data import ShardedSampler
from testbed.perturb.perturbations import StepPlan, derive_seed
from testbed.scenario.tables import DATASETS, MODELS, OPTIMIZERS
from testbed.scenario.spec import Scenario
from testbed.engine.worker import seed_everything


def plain_ddp(s: Scenario, out: Path) -> None:
    """The loop a user would write; only ``attach`` and ``monitor.step`` are the testbed's."""
    dist.init_process_group("gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    dataset = DATASETS.get(s.data.kind)(s.seed, **s.data.params)
    seed_everything(derive_seed("init", s.seed))
    model = DDP(MODELS.get(s.model.kind)(dataset, **s.model.params))
    optimizer = OPTIMIZERS.get(s.optim.kind)(model.parameters(), **s.optim.params)
    sampler = ShardedSampler(dataset.size, n, s.batch_size)
    with testbed.attach(model, out_dir=out, batch_size=s.batch_size, weight_check_every=s.metrics.weight_check_every,
                        optimizer=optimizer, steps=s.steps) as monitor:
        for step in range(s.steps):
            batch = dataset.batch(sampler.indices(step, StepPlan.synced(rank, n, step, s.seed)))
            loss = model(**batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            row = monitor.step(loss)
            assert row is not None and row["step"] == step
    dist.destroy_process_group()


def runner_order(size: int, s: Scenario) -> list[int]:
    """Sample order that makes a sequential, batch-sharded loader (accelerate gives batch j to rank
    j mod N) hand every rank the batches the built-in runner's sampler gives it."""
    sampler = ShardedSampler(size, s.world_size, s.batch_size)
    return [int(i) for step in range(s.steps) for r in range(s.world_size)
            for i in sampler.indices(step, StepPlan.synced(r, s.world_size, step, s.seed))]


def hf_trainer(s: Scenario, out: Path) -> None:
    from transformers import Trainer, TrainingArguments

    from testbed.workloads.hf import load_causal_lm

    class SequentialTrainer(Trainer):
        """Reads the dataset in order (transformers 5 also has ``train_sampling_strategy="sequential"``)."""

        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    torch.set_num_threads(s.threads_per_rank)
    dataset = DATASETS.get(s.data.kind)(s.seed, **s.data.params)
    model = load_causal_lm(s.model.params["path"])
    args = TrainingArguments(
        output_dir=str(out / "trainer"), use_cpu=True, ddp_backend="gloo", report_to="none", save_strategy="no",
        logging_strategy="no", disable_tqdm=True, seed=s.seed, max_steps=s.steps,
        per_device_train_batch_size=s.batch_size, gradient_accumulation_steps=s.grad_accum,
        dataloader_drop_last=True, dataloader_num_workers=0,
        learning_rate=s.optim.params["lr"], lr_scheduler_type="constant", max_grad_norm=0.0,
        average_tokens_across_devices=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=s.optim.params["lr"])
    trainer = SequentialTrainer(model=model, args=args, optimizers=(optimizer, None),
                                train_dataset=torch.utils.data.Subset(dataset, runner_order(dataset.size, s)))
    callback = testbed.TestbedCallback(trainer, out_dir=out, weight_check_every=1)
    trainer.add_callback(callback)
    trainer.train()
    assert [r["global_step"] for r in callback.rows] == list(range(1, s.steps + 1)), callback.rows


def main() -> None:
    mode, scenario_file, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    scenario = Scenario.from_dict(json.loads(scenario_file.read_text()))  # Scenario.to_dict() output
    assert int(os.environ["WORLD_SIZE"]) == scenario.world_size
    {"ddp": plain_ddp, "trainer": hf_trainer}[mode](scenario, out)


if __name__ == "__main__":
    main()
