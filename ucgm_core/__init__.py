"""The math of unified continuous generative models in plain PyTorch: transports, time
distributions, the UCGM-T objective, the UCGM-S sampler, a DiT, EMA and FID statistics.

Nothing here imports Ray, DeepSpeed or MLflow; see ALGORITHMS.md in the shared docs for the math.
"""
