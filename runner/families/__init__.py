"""The model families: multilabel, density, charlm, regression (the engine's test family).

Each module has ``build(bundle, model, loss, seed) -> Family`` (the interface is
runner/engine/family.py) and ``ACCEPTS``, the dataset, model and loss options that fit it
(checked by runner/engine/compat.py before anything is built).
"""
