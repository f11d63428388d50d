"""Bad input answered before anything loads, in layers, each reporting every problem it finds at once:

- `command_line`: before Hydra composes anything, misspelt keys, group options that do not exist and values of
  the wrong type on the command line (with the closest real key or option), and Hydra's own composition errors as
  one paragraph; `keys`: the schema's keys and the closest real key to a misspelt one (kohya's names too);
- `groups`: options of a list-valued group (`loss=[a,b]`) that set one key to different values;
- `validate`: the composed config's values (ranges, enums, combinations);
- `preflight`: what files alone can answer (dataset, captions, buckets, prompt files, optimizer arguments, resume
  states), per job, as the first Hydra callback; `folders`: every folder a job writes and the MLflow store;
  `sweep`: the sweep as a whole (shared output folders, launcher settings, a sweep with no jobs).
Each runs once per process: the command line and the pre-flight in the launching process; a job reads its files
with the pre-flight's readers (`job/inputs`) and checks only what it alone can know (device, folders, store, lock).
The entry (sweep.py, job/, callbacks) calls them; nothing below the top (data, model, training, ...) imports them.
"""
