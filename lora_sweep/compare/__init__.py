"""Reading runs back and comparing them: replicates and their statistics, one-knob effects, the report and the
article's table. Knows nothing of training internals.
"""
