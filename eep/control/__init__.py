"""The controller of an expert-parallel instance, as parts with one job each (see `eep.control.executor`)."""
