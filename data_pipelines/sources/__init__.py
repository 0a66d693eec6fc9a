"""Random-access sources over local files (and the synthetic world in `data_pipelines.synthetic`).

Every source has `len(source)` and `source[i] -> dict`, is cheap to pickle (records are kept as
encoded JSON and parsed on access) and reads images only when a record is accessed. A record that
cannot be read raises `example.ExampleError` with a countable reason; the pipeline counts and
redraws. A source that cannot even be opened (missing file, unparsable file) raises at
construction: that is a configuration error.
"""
