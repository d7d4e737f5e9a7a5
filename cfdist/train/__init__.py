"""Pretraining on Ray Train + DeepSpeed (the run layer it shares with fine-tuning: :mod:`cfdist.run`).

    config.py    PretrainConfig (+ data, DeepSpeed and scaling sections), YAML + key=value overrides
    engine.py    DeepSpeed config from our typed settings; engine construction
    loop.py      the per-rank training loop (Ray Train workers, torchrun ranks or one process), the
                 Ray datasets it streams and the resume contract
    driver.py    shard check, run directory, Ray bootstrap, TorchTrainer, export (cfdist pretrain)
"""
