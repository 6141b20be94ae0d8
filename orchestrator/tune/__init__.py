"""The `tune` verb: hyperparameter search over a job's keys with Ray Tune, Optuna and ASHA.

    run.py     the driver: study, searcher, scheduler, trials, resuming a killed sweep
    spec.py    the sweep spec schema and its loading (base job, job_overrides, space checks)
    modes.py   what differs between a training sweep and a sampling-only sweep
    space.py   the search space as an Optuna define-by-run function
    report.py  results.csv, results.png, best_job.yaml, the MLflow parent run
"""
