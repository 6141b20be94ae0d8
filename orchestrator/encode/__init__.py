"""The `encode` verb: VAE latents of a job's images, in resumable parquet shards (`run.py`), with
diffusers' AutoencoderKL loaded from a local or s3:// folder (`vae.py`)."""
