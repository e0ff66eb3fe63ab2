"""perturb — what can go wrong on a rank: the per-rank, per-step ``StepPlan`` and the perturbation and
fault functions that edit it (shuffle / seed desync, label noise, crashes, NaN, ...).

Imports: scenario (the registry tables), torch. Never torch.distributed: a perturbation changes one
rank's plan, it does not talk to the others.
"""
