"""Host-side data pipelines (numpy/PIL/grain): raw records -> batches of the ferret_jax contract."""
