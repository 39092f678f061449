"""Unlearning: a method's loss and selection, driven per sequence by the band, with a stop rule.

    session.py   unlearn_model(): the one entry point (runs a method's stages, returns model, outcome, lambda)
    methods/     the registry of methods by name; one file per method (its loss, options, defaults)
    target.py    the band under the current model, which sequences block the target, the stop rules
    loop.py      the gradient loop; weights.py what it trains (LoRA, a method's subset, gradient mask)
    retain.py    retain regularizers; train.py plain fine-tuning; checkpoint.py resumable state
"""
