"""Packaged YAML configs, found by name: ``<kind>/<name>.yaml`` for kind in model, pretrain,
finetune, deepspeed (see :func:`cfdist.config.resolve_config`; ``cfdist configs`` lists them)."""
