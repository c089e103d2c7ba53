"""Wire protocols: paths and pydantic models shared by each service and its clients."""
