"""The stages behind the `kdtool` subcommands, one module each, as plain functions of a config.

`train_teacher`, `distill`, `evaluate`, `export`, `prune` and `pipeline` (kdtool.stages.<name>.<name>) each
write into the run folder and return the number a sweeper optimises; `common` holds what they share.
Stages import the library below them (engine, strategies, export, models, datasets, ...), never the
other way round.
"""
