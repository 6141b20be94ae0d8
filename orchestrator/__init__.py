"""Ray, DeepSpeed, MLflow and storage glue around `ucgm_core`; no math lives here."""
