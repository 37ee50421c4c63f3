"""What the methods share: the training loop, the fused mean-field trainer, the NUTS/HMC
sampler, checkpoints, seeding and subset (last-layer) inference. Engines know no method."""
