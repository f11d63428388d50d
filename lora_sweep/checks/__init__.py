"""Bad input refused before anything loads, in layers; each layer reports every problem it finds at once.

- `command_line`: overrides before Hydra composes (misspelt keys, missing group options, wrong types) and Hydra's
  own errors as one paragraph; `keys`: the schema's keys and the closest real key to a misspelt one;
  `kohya_flags`: kohya's flags that are no setting (refused or fixed, with why) and the kohya_ss GUI's keys;
- `groups`: options of a list-valued group (`loss=[a,b]`) that disagree on a key;
- `validate`: the composed config's values; `preflight`: what files alone can answer, per job;
  `folders`: every folder a job writes and the MLflow store; `sweep`: the sweep as a whole.
Each runs once, in the launching process; a job checks only what it alone can know (device, lock, store).
Only the entry points (sweep.py, job/, callbacks) import this package.
"""
