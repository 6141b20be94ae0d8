"""The verbs that read a trained model file or a dataset through Ray Data actor pools.

    evaluate.py      Frechet distance / FID of a model file for a grid of sampler settings
    reference.py     the `reference` verb: feature statistics of a dataset split (.npz)
    generate.py      many images from a model file, in resumable PNG / parquet shards
    model_files.py   the model file to sample from, read on the driver, loaded in each actor
    sampler_grid.py  evaluation.sampler_grid: the sampler settings scored from the same noise
    extractors.py    the feature extractor a job asks for (digit classifier, FID Inception)
    decoder.py       the VAE decoder of latent-space models
"""
