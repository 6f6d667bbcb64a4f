"""Running a chain: the plan, the pre-flight, the runner, resume and reuse, the run directory, evaluation protocols, and mltl compare."""
