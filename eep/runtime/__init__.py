"""The expert-parallel runtime: rank processes, their supervisor and the executor that drives them."""
