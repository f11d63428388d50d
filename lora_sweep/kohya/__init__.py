"""kohya sd-scripts v0.8.7 and the kohya_ss GUI: their settings in (import) and out (export), via "kohya args".

- `flags`: v0.8.7's flags and their defaults (V087_DEFAULTS), the common currency of both directions.
"""
