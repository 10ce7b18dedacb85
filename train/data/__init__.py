"""The training loader: the sample order (shard_order.py, a pure function of seed, step and manifest), shard
sources (shard_source.py: local, http(s)://, s3://, gs://, pipe:), batching (loader.py) and the one image
decoder the trainer and the evaluator share (decode.py)."""
