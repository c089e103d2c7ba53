"""Container images Modelyo builds itself, without a registry (see `base` for the job image)."""
