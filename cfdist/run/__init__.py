"""The run layer pretraining and fine-tuning share.

    config.py       DataSection (shards, stream, micro-batch budget), OptimSection, RunConfigMixin
                    (run directory, model config), resolve_model_config
    objective.py    what a step fits: PropertyObjective / EnergyObjective (components, sums, loss),
                    target statistics and standardisation, reference energies
    step.py         the one training / evaluation step (forward, loss, backward) for every model kind
    evaluation.py   a model on a split: both loops' validation, fine-tuning's test, cfdist evaluate
    optim.py        AdamW parameter groups (no decay on biases, lr-scaled blocks), lr schedules
    metrics.py      metrics.jsonl + TensorBoard + progress bar; logging windows; peak memory
    runinfo.py      config.yaml and run_info.jsonl (versions, git SHA) of every run
    transfer.py     a model from a portable checkpoint (fine-tuning's heads, pretraining's init_from), freezing

The Ray bootstrap every job shares (preprocessing too) sits below this layer: :mod:`cfdist.cluster`.
"""
