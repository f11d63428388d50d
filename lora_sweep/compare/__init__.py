"""Reading runs back and comparing them: replicates, statistics, one-knob effects, the report, the article's table.

Knows nothing of training internals.
"""
