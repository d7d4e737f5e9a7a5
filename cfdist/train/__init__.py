"""Training: typed run config, DeepSpeed engine, optimiser schedules, metrics, the per-worker loop.

    config.py    PretrainConfig (+ sections), YAML + key=value overrides, run directory
    optim.py     AdamW parameter groups (no decay on biases), inverse-sqrt / warmup-cosine schedules
    engine.py    DeepSpeed config from our typed settings; engine construction
    metrics.py   per-step throughput / data-wait metrics to JSONL + TensorBoard
    loop.py      the Ray Train (or torchrun / single-process) training loop
"""
