"""engine — running a scenario as a real DP job: the DDP comm hook, the rank's worker loop, the
launchers (spawn, torchrun, the printed launch plan), sweeps, device resolution, memory estimates.

Imports: scenario, perturb, workloads, metrics, diagnose, record, torch.distributed.
"""
