"""The Modelyo agent inside the TDX VM: the owner's API, the Docker runtime, the containers'
/modelyo crypto folders and the GPUs."""
