"""`eep sim`: one wide-EP instance on a GPU cluster, through a fault schedule, by discrete events.

- `cluster`: the model's shapes and the cluster's links, read from files (`data/`).
- `constants`: every other figure, each with its source (docs/sim.md renders the table).
- `systems`: how each system answers a failure (full restart, EEP as published, SGLang Elastic
  EP, eep), as phases; eep's phases come from eep's own planner.
- `des`: the event loop: throughput over time and the figures read off it.
- `report`: `eep sim paper` and `eep sim scale`.
"""
