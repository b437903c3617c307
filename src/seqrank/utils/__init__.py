"""Run plumbing shared by train and eval: instantiators, config tree, result tables."""
