"""Reading runs back and comparing them: replicates and their statistics, one-knob effects, the report, the
article's table and the MLflow UI. Knows nothing of training internals.
"""
