"""The `tune` verb: hyperparameter search over a job's keys with Ray Tune, Optuna and ASHA.

    spec.py    the sweep spec schema and its loading (base job, job_overrides, space checks;
               the base job's paths resolved where `tune` runs)
    modes.py   what differs between a training sweep and a sampling-only sweep, one object each
    space.py   the search space as an Optuna define-by-run function
    run.py     the driver: study, searcher, trials' resources, resuming a killed sweep, failures
    trials.py  inside a trial: the trial's job and the Tune functions (train / evaluate)
    report.py  results.csv, results.png, best_job.yaml, the MLflow parent run
"""
