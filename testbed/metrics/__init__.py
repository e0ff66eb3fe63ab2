"""metrics — the pure math of the per-step metrics: per-rank norms, cosines to the mean, pairwise
cosines, the gradient-noise scale, and the bucket accumulator the comm hook feeds.

Imports: torch tensors and numpy only; never torch.distributed (the engine communicates, this room
computes). The definitions are ../shared/METRICS.md.
"""
