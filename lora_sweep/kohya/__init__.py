"""kohya sd-scripts v0.8.7 and the kohya_ss GUI: their settings in (import) and out (export), via "kohya args".

- `flags`: v0.8.7's flags, their defaults (V087_DEFAULTS) and argparse types: the common currency of both ways;
- `sources`: the readers (GUI JSON, --config_file TOML, a command line) into kohya args, problems collected;
- `settings`: kohya args -> lora-sweep group choices and values, and the import's table rows;
- `experiment`: `python -m lora_sweep import` writes conf/experiment/user/<name>.yaml (and
  conf/<group>/user/<name>.yaml for a chosen group with values) and prints the table.
"""
