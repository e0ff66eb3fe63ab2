"""engine — running a scenario as a real DP job: the DDP comm hook, the rank's worker loop, the
launchers (spawn, torchrun, the printed launch plan), live progress, sweeps, device resolution, memory
estimates.

Imports: scenario, perturb, workloads, metrics, diagnose, record, torch.distributed.
"""
