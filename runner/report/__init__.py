"""The reporting side: a sweep's summary.csv (sweep.py), its table by ``python -m runner.report``
(table.py), and every plot a run or a sweep draws (plots.py)."""
